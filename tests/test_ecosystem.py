"""pruner's outputs in the tools users run next, in pruner's own environment: OpenCLIP's trainer trains on a
materialised keep set, webdataset streams it, OpenCLIP's loader sizes it (sizes.json)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from conftest import small_job_config

from pruner.config import load_config
from pruner.io.manifests import materialize
from pruner.jobs.prune import run
from pruner.model.clip import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def materialised(tmp_path_factory, micro_trajectory):
    """The demo pool pruned to 30% by the default pipeline, materialised with DataComp's naming."""
    tmp = tmp_path_factory.mktemp("eco")
    status, summary = run(load_config(data=small_job_config(tmp, micro_trajectory, select={"keep_fraction": 0.3})))
    assert status == 0
    job = Path(summary["manifests"]["paths"]["manifest.json"]).parent.parent
    out = tmp / "pruned"
    counts = materialize(job / "keep" / "manifest.json", out, samples_per_shard=120, naming="datacomp")
    return out, counts, summary


def test_open_clip_trains_on_the_materialised_keep_set(materialised, tmp_path):
    """`python -m open_clip_train.main --dataset-type webdataset` on the materialised shards (a tiny model on the
    CPU, workers 0): it logs a finite loss and writes a checkpoint. With webdataset > 0.2.86 (open_clip_torch's
    training extra allows up to 0.2.86) its group_by_keys fails at the first shard's end with KeyError: 'fname'.
    The tiny model's config is registered the way OpenCLIP documents for custom models (add_model_config); a
    standard model (--model ViT-B-32) needs no registration."""
    out, counts, _ = materialised
    shards = f"{out}/{{00000000..{counts['shards'] - 1:08d}}}.tar"
    logs = tmp_path / "logs"
    code = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
            "from open_clip_train.main import main; main(sys.argv[2:])")
    args = ["--model", "pruner-micro", "--dataset-type", "webdataset", "--train-data", shards,
            "--train-num-samples", str(counts["samples"]), "--batch-size", "16", "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--lr", "1e-3", "--warmup", "2", "--logs", str(logs), "--name", "run", "--seed", "0",
            "--log-every-n-steps", "1", "--save-frequency", "1"]
    proc = subprocess.run([sys.executable, "-c", code, str(CONFIG_DIR)] + args, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = (logs / "run" / "out.log").read_text()
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.eE+-]+|nan|inf)", log)]
    assert losses and all(math.isfinite(x) for x in losses), log[-2000:]
    assert (logs / "run" / "checkpoints" / "epoch_1.pt").exists()


def test_webdataset_and_openclip_read_the_materialised_shards(materialised):
    """webdataset streams every kept sample (image, caption, json with its uid); OpenCLIP's get_dataset_size sizes the
    shards from sizes.json."""
    from open_clip_train.data import get_dataset_size
    out, counts, summary = materialised
    shards = f"{out}/{{00000000..{counts['shards'] - 1:08d}}}.tar"
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(samples) == counts["samples"] == summary["counts"]["kept"]
    assert all({"jpg", "txt", "json"} <= set(s) for s in samples)
    assert all(len(json.loads(s["json"])["uid"]) == 32 for s in samples)  # the demo's DataComp-style uids
    assert get_dataset_size(shards) == (counts["samples"], counts["shards"])


def test_console_shows_pruner_and_the_job_log_keeps_the_rest(tmp_path, micro_trajectory):
    """`pruner prune` in a fresh process: the console shows pruner's progress and result, not faiss' loader probing,
    Ray's start-up or C++ lines (an actor with object-store constructor arguments once printed an error line there)
    or each actor's log; those library lines go to <job>/logs/run.log."""
    import yaml
    cfg = small_job_config(tmp_path, micro_trajectory)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "pruner.cli", "prune", "--config", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=900)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "pruner: kept" in console and "shared quantities of checkpoint 0" in console
    for noise in ("Loading faiss", "core_worker.cc", "(ShardScorer pid=", "(SharedComputer pid=", "Started a local"):
        assert noise not in console, noise
    job = next(p for p in (tmp_path / "jobs").iterdir() if p.is_dir())
    assert "Loading faiss" in (job / "logs" / "run.log").read_text()
