"""pruner rescore: a new checkpoint and a grown lake give what a full re-run gives; a new target is re-scored
from stored projected features (random-projection estimates: exact against their definition, and in rank
agreement with the exact full re-run)."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from scipy.stats import spearmanr

from conftest import small_job_config
from corpus import make_good_shard, write_shard
from pruner.config import TARGET_FREE_SCORE, load_config
from pruner.io.layout import JobLayout
from pruner.io.shards import DEMO_DIR, demo_pool_shards
from pruner.io.store import Int8Copies, load_features, quantize_rows, save_features
from pruner.jobs.prune import run
from pruner.model.checkpoints import load_trajectory, save_trajectory
from pruner.cli.rescore import main
from pruner.rescore import _projected_dot, add_checkpoint, retarget, retargeted_config

METHODS = ("diffin_target", "diffin_train", "tracin_target", "tracin_self", "oga_iforest", "baseline_loss")


def _by_uid(job_dir: Path):
    t = pq.read_table(Path(job_dir) / "ranking.parquet").to_pandas()
    return t.set_index("uid").sort_index()


def _job_dir(cfg_dict) -> Path:
    out = Path(cfg_dict["output_dir"])
    dirs = [p for p in out.iterdir() if p.is_dir() and (p / "summary.json").exists()]
    return max(dirs, key=lambda p: p.stat().st_mtime)


#: extending a job is the exact_increment form's (the propagated form's terms all depend on the last checkpoint)
EXTENDABLE = {"targets": ["target", "train"], "reference_batch_size": 32, "form": "exact_increment"}


def _first_two(tmp_path: Path, trajectory: Path):
    """(a trajectory file of the first two checkpoints of ``trajectory``, its third checkpoint)."""
    traj = load_trajectory(file=str(trajectory))
    short = save_trajectory(replace(traj, checkpoints=traj.checkpoints[:2]), tmp_path / "short.json")
    return short, traj.checkpoints[2]


def test_add_checkpoint_equals_full_rerun(tmp_path, micro_trajectory):
    short, last = _first_two(tmp_path, micro_trajectory)
    cfg = small_job_config(tmp_path / "a", short, scores__diffin=EXTENDABLE)
    run(load_config(data=cfg))
    job = _job_dir(cfg)
    args = (job, last.path)
    kw = dict(step=last.step, lr=last.lr, lr_mean=last.lr_mean)
    new = add_checkpoint(*args, **kw)
    summary = json.loads((new / "summary.json").read_text())
    assert summary["run"]["checkpoints_reused"] == 2 and summary["run"]["extends"] == str(job)
    full_cfg = small_job_config(tmp_path / "b", micro_trajectory, scores__diffin=EXTENDABLE)
    run(load_config(data=full_cfg))
    a, b = _by_uid(new), _by_uid(_job_dir(full_cfg))
    assert list(a.index) == list(b.index)
    for c in METHODS:
        np.testing.assert_allclose(a[c].values, b[c].values, rtol=1e-9, atol=1e-12 * np.abs(b[c].values).max(),
                                   err_msg=c)
    assert (a["kept"].values == b["kept"].values).all()
    # the earlier checkpoints' features are the finished job's files (hard links), the new one's are computed
    old, ext = JobLayout(job), JobLayout(new)
    url = pq.read_table(ext.ranking, columns=["shard_url"])["shard_url"][0].as_py()
    assert [ext.features(url, i).stat().st_ino for i in range(2)] == [old.features(url, i).stat().st_ino
                                                                       for i in range(2)]
    np.testing.assert_array_equal(load_features(ext.features(url, 2)),
                                  load_features(JobLayout(_job_dir(full_cfg)).features(url, 2)))
    # an extension killed after some shards re-runs to the same result, rescoring only the missing ones
    ext.scores(url).unlink()
    ext.summary.unlink()
    again = add_checkpoint(*args, **kw)
    rerun = json.loads((again / "summary.json").read_text())["run"]
    assert again == new and rerun["shards_skipped"] == rerun["shards_total"] - 1
    redone = _by_uid(again)
    for c in [*METHODS, "kept"]:
        np.testing.assert_array_equal(redone[c].values, a[c].values, err_msg=c)


def test_add_checkpoint_refuses_the_propagated_form(tmp_path, micro_trajectory):
    """In Diff-In's propagated form a later checkpoint changes every checkpoint's term (the adjoint starts at the
    last one), so extending a job is refused up front, naming the fix, instead of combining stale terms."""
    cfg = load_config(data=small_job_config(tmp_path, micro_trajectory,
                                            scores={"diffin": {"form": "propagated"}}), check_paths=False)
    job = tmp_path / "job"
    job.mkdir()
    (job / "config.yaml").write_bytes(cfg.to_yaml())
    with pytest.raises(ValueError, match=r"propagated form .*\(fix: run a full job"):
        add_checkpoint(job, str(micro_trajectory.parent / "x.pt"))


def _drop_last_sample(shard: Path) -> None:
    """Rewrite a .tar.gz shard without the files of its last sample."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    last = members[-1][0].name.split(".")[0]
    with tarfile.open(shard, "w:gz") as tf:
        for m, data in members:
            if m.name.split(".")[0] != last:
                tf.addfile(m, io.BytesIO(data))


def test_extension_refuses_changed_inputs(tmp_path, micro_trajectory):
    """add_checkpoint refuses, naming the cause: a shard the job did not score, a target set that changed (other
    hash-picked samples), and a shard re-written since the job scored it (by its recorded file identity, up front;
    a shard without an identity, e.g. pipe:, is caught by the actors' uid check, test below)."""
    short, last = _first_two(tmp_path, micro_trajectory)
    lake, target = tmp_path / "lake", tmp_path / "target"
    lake.mkdir()
    shards = demo_pool_shards()
    for s in shards[:2]:
        shutil.copy(s, lake)
    shutil.copytree(DEMO_DIR / "target", target)
    # bank (100 x 4), reference (4 x 16 x 4) and OGA (100) candidates all come before the shard's last sample
    cfg = small_job_config(tmp_path, short, data={"shards": [str(lake)]}, target__shards=[str(target)],
                           features={"k": 128, "layer_k": 8, "bank_size": 100, "batch_size": 50},
                           scores={"diffin": {"targets": ["target"], "reference_batch_size": 16,
                                              "form": "exact_increment"},
                                   "oga": {"iforest_sample": 100, "iforest_trees": 50}})
    status, _ = run(load_config(data=cfg))
    job = _job_dir(cfg)

    def extend():
        return add_checkpoint(job, last.path, step=last.step, lr=last.lr, lr_mean=last.lr_mean)

    shutil.copy(shards[2], lake)
    with pytest.raises(ValueError, match="were not scored by the job being extended"):
        extend()
    (lake / Path(shards[2]).name).unlink()
    extra = target / "aaa-first.tar"
    make_good_shard(extra, n=64, prefix="x")
    with pytest.raises(ValueError, match="target samples picked now differ"):
        extend()
    extra.unlink()
    changed = lake / Path(shards[1]).name
    _drop_last_sample(changed)  # a new file identity (size, mtime): refused before any actor starts
    with pytest.raises(ValueError, match=r"1 shard\(s\), e\.g\. .*changed since the job being extended.*"
                                         r"fix: re-run that job first"):
        extend()
    assert not list((tmp_path / "jobs").glob("*/failed.json"))


def test_extension_refuses_a_changed_shard_and_a_foreign_prefix(tmp_path, micro_trajectory):
    """Extending a job checks its inputs: a shard that no longer reads as the scored samples, and a finished job
    whose config is another, or whose checkpoints (records, file digests) are not the first ones of the new
    trajectory, are refused by name."""
    from pruner.jobs.resume import reused_checkpoints
    from pruner.scorer import Scorer, ShardChangedError
    from pruner.io.shards import RejectLog, iter_shard

    cfg = load_config(data=small_job_config(tmp_path, micro_trajectory, scores__diffin=EXTENDABLE))
    traj = load_trajectory(file=str(micro_trajectory))
    url = demo_pool_shards()[0]
    samples = list(iter_shard(url, RejectLog()))[:3]
    prior = pa.table({"uid": [s.uid for s in samples[:2]]})
    scorer = Scorer(cfg, traj, device="cpu", first=2)
    with pytest.raises(ShardChangedError, match="changed since"):
        scorer.score_table(samples, url, prior)
    with pytest.raises(ValueError, match="prior score table"):
        scorer.score_table(samples, url)
    def job(name, records, config):
        root = tmp_path / name
        root.mkdir()
        (root / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
        (root / "trajectory.json").write_text(json.dumps({"checkpoints": records}))
        return JobLayout(root)

    ck = [{**c.record(), "sha256": f"digest{i}"} for i, c in enumerate(traj.checkpoints)]
    mine = job("mine", ck, cfg)
    assert reused_checkpoints(job("done", ck[:2], cfg), cfg, mine) == 2
    with pytest.raises(ValueError, match="is not checkpoint 0 of this trajectory"):
        reused_checkpoints(job("shifted", ck[1:2], cfg), cfg, mine)
    with pytest.raises(ValueError, match="or its file changed"):
        reused_checkpoints(job("rewritten", [ck[0], {**ck[1], "sha256": "other"}], cfg), cfg, mine)
    with pytest.raises(ValueError, match="already scored 3 checkpoints"):
        reused_checkpoints(job("all", ck, cfg), cfg, mine)
    other = cfg.model_copy(update={"seed": 1})
    with pytest.raises(ValueError, match="another config"):
        reused_checkpoints(job("other-config", ck[:2], other), cfg, mine)


def test_grown_lake_scores_only_new_shards(tmp_path, micro_trajectory):
    lake = tmp_path / "lake"
    lake.mkdir()
    shards = demo_pool_shards()
    for s in shards[:2]:
        shutil.copy(s, lake)
    # the bank (bank_size x 4 candidates) and the other hash-picked inputs (curvature: 32 x 4) must come from the
    # first two shards (500 samples), as in a lake whose new shards sort after the old ones
    feats = {"k": 128, "layer_k": 8, "bank_size": 100, "batch_size": 50}
    cfg = small_job_config(tmp_path, micro_trajectory, data={"shards": [str(lake)]}, features=feats)
    status, first = run(load_config(data=cfg))
    job = _job_dir(cfg)
    for s in shards[2:]:
        shutil.copy(s, lake)
    status, second = run(load_config(data=cfg))
    assert status == 0 and _job_dir(cfg) == job
    assert second["run"]["shards_skipped"] == 2 and second["counts"]["samples"] == 1000
    scratch = small_job_config(tmp_path / "scratch", micro_trajectory, data={"shards": [str(lake)]}, features=feats)
    run(load_config(data=scratch))
    a, b = _by_uid(job), _by_uid(_job_dir(scratch))
    for c in METHODS:
        np.testing.assert_array_equal(a[c].values, b[c].values, err_msg=c)


@pytest.mark.parametrize("form", ["exact_increment", "taylor", "propagated"])
def test_retarget_from_stored_features(tmp_path, micro_trajectory, form):
    """Diff-In re-targets from P g_z alone in the exact_increment and propagated forms, and with P H_z G_B
    (save_hzg) in the taylor form. Target A: the demo target shard; target B: its samples reversed, so max_samples
    picks other pairs. The propagated form is a function of the projected gradients a full run forms too, so its
    re-target reproduces the full re-run up to the fp16 storage of the features."""
    members: dict[str, dict] = {}
    with tarfile.open(DEMO_DIR / "target" / "demo-target-000000.tar.gz", "r:gz") as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tf.extractfile(m).read()
    tb = tmp_path / "target_b"
    write_shard(tb / "b-000000.tar", list(members.items())[::-1])
    feats = {"k": 1024, "layer_k": 16, "bank_size": 128, "batch_size": 50, "save_hzg": form == "taylor"}
    # the taylor job runs without TracIn: a full run still forms tracin_target and tracin_pred from its target set,
    # so the re-target must too (it once dropped tracin_pred there)
    scores = {"diffin": {"targets": ["target", "train"], "reference_batch_size": 32, "form": form,
                         "curvature_samples": 200},
              "oga": {"iforest_sample": 100, "iforest_trees": 50},
              **({"methods": ["diffin", "oga", "baselines"]} if form == "taylor" else {})}
    cfg = small_job_config(tmp_path / "a", micro_trajectory, features=feats, scores=scores)
    run(load_config(data=cfg))
    new = retarget(_job_dir(cfg), [str(tb)], device="cpu", precision="fp16")
    new8 = retarget(_job_dir(cfg), [str(tb)], device="cpu")  # the default: the features' int8 copy
    assert not any(JobLayout(_job_dir(cfg)).shards_dir.glob("*hzg*")) or form == "taylor"
    assert len(list(JobLayout(_job_dir(cfg)).int8_dir.glob("*.q8.npy"))) == 4 * 3 * (1 + (form == "taylor"))
    full = small_job_config(tmp_path / "b", micro_trajectory, features=feats, scores=scores,
                            target={"shards": [str(tb)], "max_samples": 64})
    run(load_config(data=full))
    a, a8, b = _by_uid(new), _by_uid(new8), _by_uid(_job_dir(full))
    for c in ("tracin_target", "diffin_target", "tracin_pred"):
        rho, rho8 = (spearmanr(x[c].values, b[c].values).correlation for x in (a, a8))
        print(f"{c}: Spearman(retarget, full re-run) = {rho:.3f} (fp16 features), {rho8:.3f} (int8 copy)")
        assert rho >= 0.8 and rho8 >= 0.8, (c, rho, rho8)
        # the int8 copy against the fp16 features: per dot <= 2e-3 of ||P g|| ||P v'|| (test above), far below
        # the projection's error, so the same ranking to within a few swaps
        assert np.abs(a8[c].values - a[c].values).max() <= 1e-2 * np.abs(a[c].values).max(), c
        assert spearmanr(a8[c].values, a[c].values).correlation >= 0.999, c
    if form == "propagated":
        assert spearmanr(a["diffin_target"].values, b["diffin_target"].values).correlation >= 0.999
        # the re-target's summary lists the step scales its source job's shared states hold
        summary = json.loads(JobLayout(new).summary.read_text())
        assert summary["step_scales"] == json.loads(JobLayout(_job_dir(cfg)).summary.read_text())["step_scales"]
        assert [s["source"] for s in summary["step_scales"]] == ["optimizer"] * 3
    # exact against their definitions: sum_i eta_i <P g_i(z), P v'_i> with the full re-run's own v'_i, for v_target
    # (tracin_target) and v_pred (tracin_pred, the prediction-score variant: of the new target too)
    layout, full_layout = JobLayout(_job_dir(cfg)), JobLayout(_job_dir(full))
    traj = json.loads(full_layout.trajectory.read_text())["checkpoints"]
    from pruner.scorer import Scorer
    sc = Scorer(load_config(data=full), load_trajectory(file=str(micro_trajectory)), device="cpu")
    url = demo_pool_shards()[0]
    got = pq.read_table(JobLayout(new).scores(url))
    assert not [c for c in got.column_names if c.startswith("c") and c.endswith(("_target", "_pred"))]
    for column, vector in (("tracin_target", "v_target"), ("tracin_pred", "v_pred")):
        want = np.zeros(250)
        for i, c in enumerate(traj):
            v = torch.load(full_layout.shared(i), weights_only=True)["vectors"][vector]
            pv = sc.engines[i].projector.project_weights(v).double().numpy()
            want += c["eta"] * load_features(layout.features(url, i)).astype(np.float64) @ pv
        np.testing.assert_allclose(got[column].to_numpy(), want, rtol=2e-3, atol=1e-6 * np.abs(want).max(),
                                   err_msg=column)


def test_retargeted_config_ranks_a_target_free_job_by_the_new_target():
    """A job scored without a target set and ranked the default way is re-targeted into the default pipeline of a
    job with that target set: Diff-In's target score where its form re-targets (else TracIn's), behind the filter
    stage, with the niche test where it applies; its budget stays (a threshold on the old score's scale becomes the
    count it kept). A job with a target set, a target-free score the user chose, or no target-set score to rank by
    keeps its select settings."""
    base = {"data": {"shards": ["/x"]}, "trajectory": {"checkpoints": ["c.pt"]}, "select": {"keep_count": 70}}
    free = load_config(data=base, check_paths=False)
    assert (free.select.score, free.select.filter_score, free.select.niche_alpha) == (TARGET_FREE_SCORE, None, None)
    got = retargeted_config(free, ["/t"], "propagated")
    assert got.target.shards == ["/t"] and "target" in got.scores.diffin.targets
    assert (got.select.score, got.select.filter_score, got.select.niche_alpha) == \
        ("diffin_target", TARGET_FREE_SCORE, 1e-3)
    assert got.select.keep_count == 70 and got.niche_test_applies
    got = retargeted_config(free, ["/t"], None)  # Diff-In's form cannot re-target: TracIn's score, no niche test
    assert (got.select.score, got.select.filter_score, got.select.niche_alpha) == \
        ("tracin_target", TARGET_FREE_SCORE, None)
    aimed = load_config(data={**base, "target": {"shards": ["/a"]}, "select": {"score": "tracin_target"}},
                        check_paths=False)
    got = retargeted_config(aimed, ["/t"], "propagated")
    assert got.target.shards == ["/t"] and got.select == aimed.select
    chosen = load_config(data={**base, "select": {"score": "oga_l2"}}, check_paths=False)
    assert retargeted_config(chosen, ["/t"], "propagated").select == chosen.select
    cut = load_config(data={**base, "select": {"threshold": -3.0}}, check_paths=False)
    got = retargeted_config(cut, ["/t"], "propagated", kept=123)
    assert (got.select.score, got.select.threshold, got.select.keep_count) == ("diffin_target", None, 123)
    no_target_score = load_config(data={**base, "scores": {"methods": ["diffin", "baselines"]}}, check_paths=False)
    got = retargeted_config(no_target_score, ["/t"], None)  # no TracIn, and Diff-In's form cannot re-target
    assert got.select == no_target_score.select and got.target.shards == ["/t"]


def test_retarget_of_a_job_without_a_target_set_ranks_by_the_new_target(tmp_path, micro_trajectory, monkeypatch):
    """End to end on the demo pool: a job with no target set keeps its best half by the target-free score; the
    same job re-targeted to the demo target (given as a path relative to the working directory) ranks by
    diffin_target behind the filter stage, the niche test runs, and summary.json and config.yaml say so, the
    target as an absolute path (config.yaml is read back relative to the job's own folder)."""
    cfg = small_job_config(tmp_path / "a", micro_trajectory, target={}, select={"keep_fraction": 0.5},
                           scores={"diffin": {"reference_batch_size": 32, "curvature_samples": 32},
                                   "oga": {"iforest_sample": 100, "iforest_trees": 50}})
    run(load_config(data=cfg))
    old = JobLayout(_job_dir(cfg))
    assert json.loads(old.summary.read_text())["score"] == TARGET_FREE_SCORE
    monkeypatch.chdir(DEMO_DIR)
    new = JobLayout(retarget(_job_dir(cfg), ["target"], device="cpu"))
    summary = json.loads(new.summary.read_text())
    assert summary["score"] == "diffin_target"
    assert [s["stage"] for s in summary["stages"]] == ["filter", "niche_test", "top_k"]
    assert summary["stages"][0]["score"] == TARGET_FREE_SCORE and summary["stages"][0]["set_apart"] == 200
    stored = yaml.safe_load(new.config.read_text())
    assert stored["target"]["shards"] == [str((DEMO_DIR / "target").resolve())]
    assert stored["select"]["score"] == "diffin_target"
    kept = lambda layout: {r["uid"] for r in pq.read_table(layout.ranking).to_pylist() if r["kept"]}  # noqa: E731
    assert len(kept(new)) == len(kept(old)) == 500 and kept(new) != kept(old)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("j", [1, 2, 3])
def test_projected_dot_matches_float64(tmp_path, threads, j):
    # many 512-row chunks shared out between the threads, the last one partial; plus an empty shard
    rng = np.random.default_rng(j)
    n, k = 70_001, 64
    feats = rng.standard_normal((n, k)).astype(np.float16)
    save_features(tmp_path / "f.npy", feats)
    save_features(tmp_path / "e.npy", np.zeros((0, k), np.float16))
    vec = torch.randn(k, j, generator=torch.Generator().manual_seed(j))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _projected_dot(tmp_path / "f.npy", vec)
        empty = _projected_dot(tmp_path / "e.npy", vec)
        restored = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    f64, v64 = feats.astype(np.float64), vec.double().numpy()
    # fp16 inputs and fp32 vectors are exact in float64; fp32 accumulation of k products errs by at most
    # gamma_k = k u / (1 - k u) (u = 2^-24) times sum_i |x_i v_i| (Higham, Thm 3.1)
    bound = k * 2.0 ** -24 / (1 - k * 2.0 ** -24) * (np.abs(f64) @ np.abs(v64))
    assert got.shape == (n, j) and got.dtype == np.float64 and empty.shape == (0, j)
    assert (np.abs(got - f64 @ v64) <= bound).all()
    assert restored == threads  # the pass runs its threads at intra-op 1 and restores the setting


def test_int8_copy_quantizes_rows_and_is_rebuilt_when_the_features_change(tmp_path, caplog):
    """quantize_rows: q * scale within scale / 2 of every element, an all-zero row gives scale 1 and zeros. The
    int8 copy is made once (in memory, written in the background), reused from its file, and made again (the stale
    one removed) when the features file is written again; one that cannot be written is logged, not raised."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2500, 64)) * rng.lognormal(0, 2, (2500, 1))).astype(np.float16)
    x[3] = 0
    q, scale = quantize_rows(x, chunk=1024)  # three chunks, the last one partial
    x64 = x.astype(np.float64)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale[3] == 1 and not q[3].any()
    rows = np.arange(len(x)) != 3
    np.testing.assert_allclose(scale[rows], np.abs(x64[rows]).max(1) / 127, rtol=1e-6)
    # round-to-nearest of x / scale, up to the fp32 rounding of that quotient (|q| <= 127: 127 * 2^-23 of scale)
    err = np.abs(q * scale[:, None].astype(np.float64) - x64) / scale[:, None]
    assert err.max() <= 0.5 + 127 * 2.0 ** -23, err.max()
    path, cache = tmp_path / "s.c0.npy", tmp_path / "int8"
    save_features(path, x)
    save_features(tmp_path / "s.c0.hzg.npy", x[:10])  # another file of the shard: its copy is not touched
    with Int8Copies(cache, writers=1, in_flight=1) as copies:
        copies.get(tmp_path / "s.c0.hzg.npy")
        q1, s1 = copies.get(path)  # made in memory, written in the background
    assert not isinstance(q1, np.memmap)
    np.testing.assert_array_equal(q1, q)
    built = sorted(p.name for p in cache.iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(built) == 4 and not [n for n in os.listdir(cache) if n.startswith(".")]  # no temporary left
    with Int8Copies(cache) as copies:
        q2, s2 = copies.get(path)
    assert isinstance(q2, np.memmap)  # reused, not rebuilt
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, s1)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**9))  # written again, other content
    save_features(path, -x)
    with Int8Copies(cache) as copies:
        np.testing.assert_array_equal(copies.get(path)[0], -q)
    after = sorted(p.name for p in cache.iterdir())
    assert len(after) == 4 and set(after) & set(built) == {n for n in built if ".hzg." in n}
    blocked = tmp_path / "blocked"
    blocked.write_text("")  # not a directory: the copy cannot be written, the pass still gets it
    with caplog.at_level(logging.WARNING, logger="pruner.io.store"), Int8Copies(blocked) as copies:
        np.testing.assert_array_equal(copies.get(path)[0], -q)
    assert "not written" in caplog.text and "--precision fp16" in caplog.text


@pytest.mark.parametrize("k", [1024, 100])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_pass_error_against_exact_dots(tmp_path, threads, k):
    """The int8 re-target pass against float64 dots of the fp16 features (row norms spread over e^+-4). The int8
    rounding errs by at most scale / 2 = max|row| / 254 per element, about max|row| ||v|| / (127 sqrt(12)) =
    2.3e-3 max|row| ||v|| per dot (1 sd, any k): allowed 5 sd at most, 1.1 sd as the median (bfloat16 rounding of
    the vectors and of the integer dots is small beside it). At k = 1024 that is the figure the docs quote: <= 2e-3
    of ||row|| ||v||, median <= 4e-4. k = 100, not a multiple of 8, is padded in the copy (the op alone is wrong
    there). Bitwise the same for 1 and 2 threads and whether the copy is made in memory or read from its file; an
    empty shard gives [0, j]."""
    rng = np.random.default_rng(1)
    n = 3000
    x = (rng.standard_normal((n, k)) * rng.lognormal(0, 2, (n, 1))).astype(np.float16)
    save_features(tmp_path / "f.npy", x)
    save_features(tmp_path / "e.npy", np.zeros((0, k), np.float16))
    vec = torch.randn(k, 3, generator=torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with Int8Copies(tmp_path / "int8") as copies:  # the copy made in memory
            got = _projected_dot(tmp_path / "f.npy", vec, int8=copies)
            empty = _projected_dot(tmp_path / "e.npy", vec, int8=copies)
        torch.set_num_threads(3 - threads)
        with Int8Copies(tmp_path / "int8") as copies:  # read back from its file
            again = _projected_dot(tmp_path / "f.npy", vec, int8=copies)
    finally:
        torch.set_num_threads(old)
    x64, v64 = x.astype(np.float64), vec.double().numpy()
    err = np.abs(got - x64 @ v64)
    by_max = err / (np.abs(x64).max(1)[:, None] * np.linalg.norm(v64, axis=0)[None])
    by_norm = err / (np.linalg.norm(x64, axis=1)[:, None] * np.linalg.norm(v64, axis=0)[None])
    print(f"k={k}: error / (max|row| ||v||) median {np.median(by_max):.1e}, max {by_max.max():.1e}; "
          f"error / (||row|| ||v||) median {np.median(by_norm):.1e}, max {by_norm.max():.1e}")
    assert by_max.max() <= 5 * 2.3e-3 and np.median(by_max) <= 1.1 * 2.3e-3
    assert k != 1024 or (by_norm.max() <= 2e-3 and np.median(by_norm) <= 4e-4)
    np.testing.assert_array_equal(got, again)
    assert empty.shape == (0, 3)


def test_retarget_refuses_feature_policies_up_front(tmp_path, micro_trajectory):
    """A job whose selection reads stored features (cluster_balanced) cannot be re-targeted yet: a clear error
    before any gradient pass, not a missing-file error at the end."""
    cfg = small_job_config(tmp_path, micro_trajectory, select={"score": "diffin_target", "keep_fraction": 0.5,
                                                               "policy": "cluster_balanced", "n_clusters": 4})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="cluster_balanced.*not supported yet; fix"):
        retarget(tmp_path, [str(tmp_path / "new-target")])


def test_retarget_refuses_unscored_or_changed_shards_up_front(tmp_path, micro_trajectory, capsys):
    """Re-targeting reads every pool shard's stored features: after the lake grew, or a scored shard changed, it
    refuses before any gradient pass, naming the shards and the fix (re-run the job), and writes nothing."""
    lake = tmp_path / "lake"
    lake.mkdir()
    shards = demo_pool_shards()
    scored = Path(shutil.copy(shards[0], lake))
    cfg = small_job_config(tmp_path, micro_trajectory, data={"shards": [str(lake)]},
                           features={"k": 128, "layer_k": 8, "bank_size": 32, "batch_size": 50})
    status, _ = run(load_config(data=cfg))
    job = _job_dir(cfg)
    assert status == 0
    before = sorted(p for p in job.rglob("*"))
    target = str(DEMO_DIR / "target")

    added = Path(shutil.copy(shards[1], lake))
    assert main([str(job), "--target", target]) == 1
    err = capsys.readouterr().err
    assert f"1 shard(s) were never scored by the job (the lake grew since it ran): {added}" in err
    assert f"fix: re-run the job first, `pruner prune --config {job / 'config.yaml'}`" in err
    added.unlink()
    st = scored.stat()
    os.utime(scored, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # re-written since it was scored
    assert main([str(job), "--target", target]) == 1
    err = capsys.readouterr().err
    assert f"1 shard(s) changed since the job scored them: {scored}" in err and "Traceback" not in err
    assert sorted(p for p in job.rglob("*")) == before  # no retarget directory, partial or not


def test_delete_predicts_and_writes_the_parameter_update(tmp_path, micro_trajectory, capsys):
    """`pruner rescore <job> --delete` prints the predicted change of the target loss, which is the sum of the stored
    influences over the set; --write-update writes theta_T + the set's parameter influence as an OpenCLIP checkpoint
    that open_clip and pruner load, moving only the scored (linear) parameters, and whose first-order effect on the
    target loss <v_target, delta> agrees with the sketched prediction (parameter space vs the k-dim sketch)."""
    import open_clip

    from pruner.deletion import predict, read_uids
    from pruner.model.checkpoints import load_state_dict
    from pruner.model.clip import register_configs
    cfg = small_job_config(tmp_path, micro_trajectory)
    run(load_config(data=cfg))
    job = _job_dir(cfg)
    layout = JobLayout(job)
    ranking = pq.read_table(layout.ranking).to_pandas()
    dropped = ranking[~ranking["kept"]]
    out = tmp_path / "updated.pt"
    assert main([str(job), "--delete", "dropped", "--write-update", str(out), "--lanczos-steps", "12"]) == 0
    printed = capsys.readouterr().out
    pred = predict(layout, read_uids(layout, "dropped"))
    assert pred["n"] == len(dropped) == 500 and pred["missing"] == 0
    assert pred["predicted_change"]["diffin_target"] == pytest.approx(dropped["diffin_target"].sum(), rel=1e-12)
    assert f"diffin_target {pred['predicted_change']['diffin_target']:+.6g}" in printed
    # the job's summary predicts the same for its dropped set, TracIn's column with its 1/N share per sample too
    summary = json.loads(layout.summary.read_text())["predicted_target_loss_change_from_dropped"]
    assert summary.keys() == pred["predicted_change"].keys() and "tracin_target" in summary
    for column, value in pred["predicted_change"].items():
        assert summary[column] == pytest.approx(value, rel=1e-9), column
    subset = tmp_path / "some.parquet"  # a file of uids works the same way
    pq.write_table(pa.table({"uid": dropped["uid"].tolist()[:7] + ["not-a-uid"]}), subset)
    some = predict(layout, read_uids(layout, str(subset)))
    assert some["n"] == 7 and some["missing"] == 1
    assert some["predicted_change"]["diffin_target"] == pytest.approx(dropped["diffin_target"][:7].sum(), rel=1e-12)
    # the checkpoint: open_clip's own loader and pruner's read it; only linear layers moved
    register_configs()
    model = open_clip.create_model("pruner-micro", pretrained=None)
    open_clip.load_checkpoint(model, str(out))
    new, old = load_state_dict(str(out)), load_state_dict(load_trajectory(file=str(micro_trajectory)).checkpoints[-1].path)
    moved = {k for k in old if not torch.equal(new[k], old[k])}
    assert moved and all("proj" in k or "c_fc" in k or "c_proj" in k or "in_proj" in k for k in moved), moved
    change = float(re.search(r"<v_target, delta> ([-+0-9.e]+)", printed).group(1))
    assert change == pytest.approx(pred["predicted_change"]["diffin_target"], rel=0.15)
