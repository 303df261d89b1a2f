"""notebooks/explore_job.ipynb executes top to bottom with nbclient on a real finished job and shows its views."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.test_report import finished_job, per_class_counts, policy_job

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_job.ipynb"


@pytest.fixture(scope="module")
def job(tmp_path_factory, micro_trajectory) -> Path:
    return finished_job(tmp_path_factory, micro_trajectory)


def execute(nb, cwd: Path) -> None:
    """Run every cell in a fresh python3 kernel started in ``cwd``; raises CellExecutionError on any error."""
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()


def outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_notebook_runs_on_the_job_from_the_environment(job, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNER_JOB_DIR", str(job))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not outputs(nb), "commit the notebook without outputs"
    execute(nb, tmp_path)
    outs = outputs(nb)
    assert not [o for o in outs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    summary = json.loads((job / "summary.json").read_text())
    assert f"job: {job.resolve()}" in text and f"kept {summary['counts']['kept']:,} of" in text
    images = [o for o in outs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # score histograms, most helpful, most harmful, per-class bars
    tables = "".join(o["data"].get("text/html", "") for o in outs if "data" in o)
    assert "diffin_target" in tables and "airplane" in tables and "keep rate" in tables


def test_default_job_is_the_newest_under_runs_demo_jobs(job, tmp_path, monkeypatch):
    """Without PRUNER_JOB_DIR the setup cell picks the newest finished job under runs/demo/jobs."""
    monkeypatch.delenv("PRUNER_JOB_DIR", raising=False)
    jobs = tmp_path / "runs" / "demo" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "unfinished").mkdir()  # no summary.json: never picked
    old = jobs / "demo-old" / "summary.json"
    old.parent.mkdir()
    old.write_text("{}")
    os.utime(old, (1e9, 1e9))  # finished in 2001
    (jobs / "demo-0123").symlink_to(job, target_is_directory=True)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells = nb.cells[: first_code + 1]
    execute(nb, tmp_path)
    text = "".join(o.get("text", "") for o in outputs(nb))
    assert f"job: {job.resolve()}" in text


def test_notebook_runs_on_a_policy_job(tmp_path_factory, micro_trajectory, tmp_path, monkeypatch):
    """A job reduced with select.policy (summary.json ``selection`` null): every cell runs and the per-class table
    is the policy's keep set."""
    job = policy_job(tmp_path_factory, micro_trajectory)
    monkeypatch.setenv("PRUNER_JOB_DIR", str(job))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    execute(nb, tmp_path)
    outs = outputs(nb)
    assert not [o for o in outs if o.output_type == "error"]
    assert "(class_balanced): kept" in "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    table = nb.cells[-1].outputs[-1]["data"]["text/plain"].splitlines()  # the per-class DataFrame
    shown = {line.split()[0]: [int(line.split()[1]), int(line.split()[2])] for line in table[1:]}
    assert shown == per_class_counts(job)
