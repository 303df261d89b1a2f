"""Smoke run of benchmarks/quality.py at a toy size: every stage runs (noisy shards, proxy training, in-process
scoring with every method, coreset retraining + zero-shot/retrieval evaluation, a selection policy as a coreset
method, counterfactual groups, data deletion with the parameter-space update) and the result JSON has every key. Numbers are meaningless at this
size (the proxy is at chance after a few steps); only structure and ranges are checked."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
needs_data = pytest.mark.skipif(not (DATA / "train").is_dir(), reason="shared CIFAR-10 shards not present")

REQUIRED = ["auroc", "average_precision", "coreset_zero_shot", "full_data_zero_shot", "clean_data_zero_shot",
            "counterfactual_spearman", "seeds", "config", "found_at", "auroc_per_class", "coreset_recall",
            "full_data_recall", "clean_data_recall", "deletion", "std", "wall_time_s", "command", "goals",
            "per_seed", "diagnostics"]
METHODS = ["diffin_target", "diffin_train", "diffin_self", "tracin_target", "tracin_self", "oga_iforest", "oga_l1",
           "oga_l2", "baseline_clip_score", "baseline_loss", "baseline_random"]


@needs_data
def test_quality_smoke(tmp_path):
    out = tmp_path / "quality.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--no-ray", "--device", "cpu",
           "--work-dir", str(tmp_path / "work"), "--out", str(out), "--seeds", "1",
           "--train-shards", "1", "--test-shards", "1", "--pool-size", "600", "--target-size", "40",
           "--steps", "8", "--checkpoints", "2", "--groups", "2", "--noise-runs", "0", "--deletion-drop", "0",
           "--coreset-methods", "diffin_target", "--keep-fractions", "0.5", "--balanced-methods", "diffin_target",
           "--eval-size", "300",
           "--retrieval-size", "100", "--bank-size", "64", "--k", "64", "--reference-batch-size", "16",
           "--self-rank", "1", "--policies", "class_balanced", "--policy-scores", "baseline_loss"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    missing = [k for k in REQUIRED if k not in r]
    assert not missing, missing
    assert set(METHODS) <= set(r["auroc"]) and set(METHODS) <= set(r["average_precision"])
    for m in METHODS:
        assert 0.0 <= r["auroc"][m] <= 1.0 and 0.0 <= r["average_precision"][m] <= 1.0
        assert set(r["found_at"][m]) == {"0.1", "0.2", "0.3"}
    assert 0.0 <= r["coreset_zero_shot"]["diffin_target"]["keep_0.5"] <= 1.0
    assert 0.0 <= r["full_data_zero_shot"] <= 1.0 and 0.0 <= r["clean_data_zero_shot"] <= 1.0
    assert set(r["counterfactual_spearman"]) == {"diffin_target", "tracin_target"}
    assert r["seeds"] == [0] and r["config"]["pool_size"] == 600
    d = r["deletion"]["diffin_target_keep_0.5"]
    assert d["n_dropped"]["mean"] == 300
    for k in ("target_loss_original", "target_loss_param_update", "target_loss_retrained"):
        assert d[k]["mean"]["bank"] > 0
    assert "| diffin_target |" in proc.stdout and "Goals:" in proc.stdout
    # a selection policy as a coreset method (through a Ray prune job with features.save)
    assert 0.0 <= r["coreset_zero_shot"]["baseline_loss:class_balanced"]["keep_0.5"] <= 1.0
    assert r["per_seed"][0]["policy_selection"]["baseline_loss:class_balanced"]["keep_0.5"]["groups"] == 10
    assert "| baseline_loss:class_balanced |" in proc.stdout
    print(f"smoke run took {time.time() - t0:.0f} s")


@needs_data
def test_filter_statistic_smoke(tmp_path):
    """benchmarks/filter_statistic.py at a toy size: per seed the proxy's checkpoints, both statistics' AUROC (last
    checkpoint, per checkpoint, trajectory mean) and the retrained coresets; the summary pairs them over the seeds."""
    out = tmp_path / "filter.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "filter_statistic.py"), "--seeds", "0,1",
           "--work-dir", str(tmp_path / "work"), "--out", str(out), "--train-shards", "1", "--test-shards", "1",
           "--pool-size", "300", "--steps", "6", "--checkpoints", "2", "--bank-size", "32", "--keep", "0.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    assert [r["seed"] for r in res["per_seed"]] == [0, 1]
    for r in res["per_seed"]:
        assert r["steps"] == [3, 6] and len(r["auroc_per_checkpoint"]["loss"]) == 2
        assert all(0 <= v <= 1 for v in r["auroc"].values())
        assert all(r["auroc"][s] == r["auroc_per_checkpoint"][s][-1] for s in ("clip_score", "loss"))
        assert set(r["zero_shot"]) == {"full", "clip_score:keep_0.5", "loss:keep_0.5"}
        assert all(0 <= v <= 1 for v in r["swapped_kept"].values())
    assert set(res["summary"]["trajectory_mean_minus_last"]) == {"clip_score", "loss"}
    assert set(res["summary"]["zero_shot"]["keep_0.5"]) == {"clip_score", "loss"}
    pair = res["summary"]["loss_minus_clip_score"]
    assert pair["auroc"]["n"] == 2 and pair["zero_shot_keep_0.5"]["n"] == 2
    assert abs(pair["auroc"]["mean"] - np.mean([r["auroc"]["loss"] - r["auroc"]["clip_score"]
                                                for r in res["per_seed"]])) < 1e-12


@needs_data
def test_quality_target_smoke(tmp_path):
    """benchmarks/quality_target.py at a toy size (one seed, its 3- and 5-class targets, two Ray prune jobs, every
    selection retrained), then quality_target_variants.py on its work dir: the variants script rebuilds the run's pool
    and finds the default's retrained coresets in the run's cache, so its default reproduces the run's figures
    without training anything."""
    work, out, var = tmp_path / "work", tmp_path / "qt.json", tmp_path / "variants.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality_target.py"), "--seeds", "0", "--work-dir", str(work),
           "--out", str(out), "--pool-size", "600", "--per-class", "4", "--steps", "8", "--checkpoints", "2",
           "--bank-size", "32", "--k", "64", "--retrieval-size", "50", "--diffin-forms", "propagated",
           "--selections", "random,intersection,filter>diffin_target:propagated"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    assert res["seeds"] == [0] and res["default_score"] == "filter>diffin_target:propagated"
    assert len(res["per_problem"]) == 2 and [len(p["classes"]) for p in res["per_problem"]] == [3, 5]
    for p in res["per_problem"]:
        for sel in ("random", "intersection", "filter>diffin_target:propagated"):
            for keep in ("keep_0.3", "keep_0.1"):
                assert 0.0 <= p["selections"][sel][keep]["zero_shot_target"] <= 1.0, (sel, keep)
    files = sorted(work.rglob("*"))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality_target_variants.py"), "--work-dir", str(work),
           "--seeds", "0", "--steps", "8", "--pool-size", "600", "--per-class", "4", "--variants", "default",
           "--retrain", "--run-json", str(out), "--out", str(var)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert sorted(work.rglob("*")) == files  # nothing trained or written: every coreset came from the run's cache
    rows = json.loads(var.read_text())["variants"]["default"]
    for keep in ("keep_0.3", "keep_0.1"):
        got = [r["target_zero_shot"] for r in rows[keep]["problems"]]
        assert got == [p["selections"]["filter>diffin_target:propagated"][keep]["zero_shot_target"]
                       for p in res["per_problem"]]


def test_filter_statistic_loss_is_the_symmetric_bank_infonce():
    """benchmarks/filter_statistic.statistics against a per-pair loop: -loss = s<x,y> minus the mean of the two
    directions' logsumexp over the pair's own logit and its bank logits, the pair's own bank row left out (tolerance
    1e-10, float64); the CLIP score is the cosine."""
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import filter_statistic as fs

    class Embedder(torch.nn.Module):
        """encode_image / encode_text as fixed random linear maps, logit scale 2."""

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.wi, self.wt = torch.randn(12, 6, generator=g), torch.randn(5, 6, generator=g)
            self.logit_scale = torch.tensor(float(np.log(2.0)))

        def encode_image(self, x):
            return x.flatten(1) @ self.wi

        def encode_text(self, t):
            return t.float() @ self.wt

    g = torch.Generator().manual_seed(1)
    images, tokens = torch.randn(9, 3, 2, 2, generator=g), torch.randint(0, 4, (9, 5), generator=g)
    bank = np.array([1, 4, 6])
    model = Embedder()
    got = fs.statistics(model, images, tokens, bank)
    x = F.normalize(model.encode_image(images).float(), dim=-1).double()  # as quality_lib._encode embeds (fp32)
    y = F.normalize(model.encode_text(tokens).float(), dim=-1).double()
    for i in range(9):
        others = [b for b in bank if b != i]
        pos = 2.0 * x[i] @ y[i]
        i2t = torch.stack([pos] + [2.0 * x[i] @ y[b] for b in others])
        t2i = torch.stack([pos] + [2.0 * y[i] @ x[b] for b in others])
        loss = 0.5 * (torch.logsumexp(i2t, 0) + torch.logsumexp(t2i, 0)) - pos
        assert abs(got["loss"][i] + float(loss)) < 1e-10
        assert abs(got["clip_score"][i] - float(x[i] @ y[i])) < 1e-10
