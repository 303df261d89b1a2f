"""The two runners of a job and the generic retrying pool under the Ray one (pruner.distributed).

The local runner (``pruner prune --local``, pruner.distributed.local) takes the plan the Ray runner takes and must
write the same files with the same bytes; it resumes and reports failures the same way. The pool
(pruner.distributed.pool.RetryingActorPool) is tested on its own with real Ray actors and toy items: it knows
nothing of shards.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pruner.config import load_config
from pruner.io.layout import JobLayout
from pruner.io.shards import DEMO_DIR
from pruner.jobs.jobdir import resolve_job
from tests.conftest import small_job_config


def write_job(tmp: Path, trajectory: Path, **overrides) -> Path:
    cfg = small_job_config(tmp, trajectory, **overrides)
    cfg["features"]["save"] = True  # features files compared too
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_same_job_files(a: JobLayout, b: JobLayout, pool: list[str]) -> None:
    """The ranking, every shard's score table and features, the shared states and OGA subsample: equal bytes of
    content (Parquet compared as tables: its file metadata names the writer's time-free but path-full settings)."""
    import torch
    assert pq.read_table(a.ranking).equals(pq.read_table(b.ranking))
    m = len(json.loads(a.trajectory.read_text())["checkpoints"])
    for url in pool:
        assert pq.read_table(a.scores(url)).equals(pq.read_table(b.scores(url))), url
        for i in range(m):
            assert a.features(url, i).read_bytes() == b.features(url, i).read_bytes(), (url, i)

    def same(x, y, where):
        assert type(x) is type(y), where
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for j, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{j}]")
        else:
            assert x == y, where
    for i in range(m):
        same(*(torch.load(x.shared(i), weights_only=True) for x in (a, b)), f"shared {i}")
    assert np.array_equal(np.load(a.oga_subsample), np.load(b.oga_subsample))
    assert json.loads(a.shared_inputs.read_text()) == json.loads(b.shared_inputs.read_text())


def test_local_runner_writes_what_the_ray_runner_writes(tmp_path, micro_trajectory, one_torch_thread):
    """`pruner prune --local` and the Ray runner (2 actors, a private local Ray) on the same config: the same job
    id, and the same ranking, score tables, features, shared states and OGA subsample, bit for bit."""
    from pruner.cli.prune import main
    from pruner.jobs.prune import run
    ray_cfg = load_config(write_job(tmp_path / "ray", micro_trajectory))
    status, summary = run(ray_cfg)
    assert status == 0 and summary["run"]["actors"] == 2
    local_path = write_job(tmp_path / "local", micro_trajectory)
    assert main(["--config", str(local_path), "--local"]) == 0
    a, b = resolve_job(ray_cfg), resolve_job(load_config(local_path))
    assert a.layout.root.name == b.layout.root.name  # the runner is not part of the job id
    summary_b = json.loads(b.layout.summary.read_text())
    assert summary_b["run"]["actors"] == 0
    assert summary_b["run"]["samples_scored_this_run"] == summary["counts"]["samples"]
    assert_same_job_files(a.layout, b.layout, a.pool)


def test_local_runner_reports_a_bad_shard_then_resumes(tmp_path, micro_trajectory, one_torch_thread, capsys):
    """A shard that is not a tar archive fails the local run as it fails a Ray run: exit 1, failed.json with one
    clean line and the traceback apart, tried once (no retry can help), the good shards' results kept, nothing
    selected. Once it is removed, the re-run scores nothing again and selects from the complete pool."""
    from pruner.jobs.prune import run
    pool = tmp_path / "pool"
    pool.mkdir()
    for p in sorted((DEMO_DIR / "pool").glob("*.tar.gz"))[:2]:
        shutil.copy(p, pool / p.name)
    bad = pool / "demo-pool-000099.tar.gz"
    bad.write_bytes(b"<html>503 Service Unavailable</html>\n" * 20)
    cfg = load_config(data=small_job_config(tmp_path, micro_trajectory, data={"shards": [str(pool / "*.tar.gz")]},
                                            ray={"max_retries": 2}))
    status, stats = run(cfg, local=True)
    assert status == 1
    layout = resolve_job(cfg).layout
    failed = json.loads(layout.failed.read_text())
    assert list(failed["shards_failed"]) == [str(bad)] and failed["failed_attempts"] == {str(bad): 1}
    message = failed["shards_failed"][str(bad)]
    assert message.startswith(f"ShardNotATarError: cannot read {bad} as a tar archive") and "\n" not in message
    assert 'File "' in failed["failure_tracebacks"][str(bad)]
    good = sorted(str(p) for p in pool.glob("demo-pool-00000?.tar.gz"))
    assert all(layout.scores(u).exists() for u in good) and not layout.ranking.exists()

    bad.unlink()
    status, summary = run(cfg, local=True)
    assert status == 0 and not layout.failed.exists()
    assert summary["run"]["shards_skipped"] == 2 and summary["run"].get("samples_scored_this_run", 0) == 0
    uids = pq.read_table(layout.ranking, columns=["uid"])["uid"].to_pylist()
    scored = sum(pq.read_metadata(layout.scores(u)).num_rows for u in good)
    assert len(uids) == len(set(uids)) == scored > 0


@pytest.fixture(scope="module")
def private_ray():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def test_retrying_pool_retries_gives_up_and_reports(private_ray, tmp_path):
    """Toy items on 2 real actors: an item that fails once is retried and completes; one raising a final error
    type is given up after one attempt; one that always fails after 1 + max_retries attempts; the rest complete
    once each. on_result's ValueError counts as a failed attempt too."""
    ray = private_ray
    from pruner.distributed.pool import RetryingActorPool, placement_guard

    @ray.remote(max_restarts=1, max_task_retries=0, num_cpus=1)
    class Worker:
        def ping(self):
            return 1

        def work(self, item: int, marks: str):
            mark = Path(marks) / str(item)
            first = not mark.exists()
            mark.touch()
            if item == 1 and first:
                raise OSError("passing I/O error")
            if item == 2:
                raise KeyError("deterministic")
            if item == 3:
                raise OSError("always")
            return item * 10

    marks = tmp_path / "marks"
    marks.mkdir()
    pool = RetryingActorPool([Worker.remote() for _ in range(2)], max_retries=2, final=(KeyError,),
                             wait_placed=placement_guard(30, "1 CPU"), desc="items")
    results, failures = {}, []

    def on_result(item, value):
        if item == 5 and 5 not in results:
            results[5] = None
            raise ValueError("could not write the result")
        results[item] = value
        return 1

    def on_failure(item, error, attempt, given_up):
        failures.append((item, type(error).__name__, attempt, given_up))

    timing = pool.run(list(range(6)), lambda actor, item: actor.work.remote(item, str(marks)), on_result, on_failure)
    assert results == {0: 0, 1: 10, 4: 40, 5: 50}
    assert timing["units_done"] == 4 and timing["actors_ready_at_start"] >= 1
    gave_up = {(item, attempt) for item, _, attempt, given_up in failures if given_up}
    assert gave_up == {(2, 1), (3, 3)}
    retried = sorted(item for item, _, _, given_up in failures if not given_up)
    assert retried == [1, 3, 3, 5]


def test_a_local_job_imports_no_ray(tmp_path, micro_trajectory):
    """`pruner prune --local` needs no Ray installed or started: a whole job run by it (a subprocess: score, reduce,
    exit 0) never imports Ray."""
    import os
    import subprocess
    import sys
    cfg = small_job_config(tmp_path, micro_trajectory, scores={"methods": ["tracin", "baselines"]},
                           select={"score": "tracin_target", "keep_fraction": 0.5})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = ("import sys; from pruner.cli.prune import main; rc = main(['--config', sys.argv[1], '--local']); "
            "print('RAY', sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RAY []" in done.stdout, done.stdout[-2000:]
    assert resolve_job(load_config(path)).layout.ranking.exists()
