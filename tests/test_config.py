"""Job config validation: errors name the key path and the fix; overrides; path resolution; fingerprints."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from pruner.cli import main as cli_main
from pruner.config import TARGET_FREE_SCORE, ConfigError, load_config, load_job_config
from pruner.io.shards import DEMO_DIR
from pruner.scores.combine import score_columns
from pruner.scores.methods import METHODS


_MICRO: dict = {}


def _micro_state() -> dict:
    """A real pruner-micro state dict (random weights), made once."""
    if not _MICRO:
        from pruner.model.clip import create_clip
        torch.manual_seed(0)
        _MICRO.update(create_clip("pruner-micro")[0].state_dict())
    return _MICRO


def _trajectory(folder, *names: str):
    """A trajectory file as train-proxy writes it (checkpoint paths relative to it, the architecture recorded), with
    each checkpoint beside it: real pruner-micro weights, so the pre-flight check passes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        torch.save({"step": 10 * (i + 1), "state_dict": _micro_state()}, folder / name)
    traj = folder / "trajectory.json"
    traj.write_text(json.dumps({"arch": "pruner-micro", "checkpoints": [{"path": n, "step": 10 * (i + 1), "lr": 1e-3}
                                                                       for i, n in enumerate(names)]}))
    return traj


def _base(tmp_path) -> dict:
    traj = _trajectory(tmp_path, "ckpt-10.pt")
    return {"data": {"shards": [str(DEMO_DIR / "pool")]}, "trajectory": {"file": str(traj)},
            "scores": {"diffin": {"targets": ["train"]}}, "select": {"score": "diffin_train"}}


def _write(tmp_path, d) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_valid_config_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, _base(tmp_path)))
    assert cfg.features.k == 1024 and cfg.features.bank_size == 4096
    assert cfg.select.keep_fraction == 0.5  # default when no criterion is given
    assert cfg.scores.diffin.fd_scheme == "central"


def test_unknown_key_names_its_path(tmp_path):
    d = _base(tmp_path)
    d["features"] = {"kk": 3}
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, d))
    assert "features.kk: unknown key" in str(e.value) and "fix:" in str(e.value)


def test_missing_required_section(tmp_path):
    d = _base(tmp_path)
    del d["data"]
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        load_config(_write(tmp_path, d))


@pytest.mark.parametrize("key,value,fragment", [
    ("features.k", 0, "features.k"),
    ("select.keep_fraction", 1.5, "select.keep_fraction"),
    ("scores.oga.trim_fraction", 0, "scores.oga.trim_fraction"),
    ("model.precision", "fp8", "model.precision"),
    ("name", "a b", "name"),
])
def test_impossible_values(tmp_path, key, value, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _base(tmp_path)), [f"{key}={value}"])
    assert fragment in str(e.value)


def test_two_selection_criteria_rejected(tmp_path):
    with pytest.raises(ConfigError, match="give one of keep_fraction, keep_count, threshold"):
        load_config(_write(tmp_path, _base(tmp_path)), ["select.keep_fraction=0.3", "select.keep_count=10"])


@pytest.mark.parametrize("overrides,fragment", [
    (["select.threshold=0.1", "select.policy=cluster_balanced"], "select: Value error, threshold cannot be combined"),
    (["select.threshold=0.1", "select.dedup_threshold=0.99"], "(fix: give keep_fraction or keep_count instead)"),
    (["select.policy=random"], "select.policy"),
    (["select.dedup_threshold=0"], "select.dedup_threshold"),
    (["select.dedup_threshold=1.5"], "select.dedup_threshold"),
    (["select.dedup_space=pixels"], "select.dedup_space"),
    (["select.n_clusters=0"], "select.n_clusters"),
    (["select.policy=cluster_balanced", "features.save=false"], "features.save is false (fix: set features.save"),
    (["select.dedup_threshold=0.99", "features.save=false"], "features.save is false"),
    (["select.dedup_keys=1"], "select.dedup_keys: unknown key"),
    # select.score must be a column the configured methods produce; the error lists those
    (["scores.methods=[diffin]", "select.score=tracin_target"],
     "select.score 'tracin_target' is a tracin score but scores.methods is ['diffin'] (fix: add tracin"),
    (["scores.methods=[tracin, oga]"], "select.score 'diffin_train' is a diffin score"),
    (["select.score=oga_l2", "scores.methods=[diffin, baselines]"], "is a oga score"),
    (["select.score=baseline_clip_score", "scores.methods=[diffin, tracin]"],
     "is a baselines score but scores.methods is ['diffin', 'tracin'] (fix: add baselines to scores.methods, or "
     "set select.score to one of the columns the configured methods produce: ['diffin_train', 'tracin_self']"),
    (["select.score=diffin_self"], "needs the target 'self' in scores.diffin.targets ['train'] (fix: add it, or"),
    (["select.score=tracin_targt"], "select.score 'tracin_targt' is not a score column (fix: set select.score to one "
     "of the columns the configured methods produce: ['diffin_train', 'tracin_self', 'oga_l2', 'oga_l1', "
     "'oga_iforest', 'baseline_loss', 'baseline_clip_score', 'baseline_random'])"),
    (["select.score=clip_score"], "select.score 'clip_score' is not a score column"),
    (["select.score=c0_loss"], "select.score 'c0_loss' is not a score column"),
    (["select.score=tracin_pred"], "'tracin_pred' is formed from the target set but target.shards is empty "
     "(fix: set target.shards, or"),
])
def test_select_config_errors(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _base(tmp_path)), overrides)
    assert fragment in str(e.value)


def test_score_choices_are_the_columns_a_job_writes(tmp_path):
    """select.score accepts exactly the method columns the scorer writes (pruner.scorer.combine_columns on the
    components of a job with every method and Diff-In target), so no name the reduce step would not find passes."""
    from pruner.scorer import combine_columns
    from pruner.scores.weights import CheckpointWeights
    from pruner.scores.oga import fit_isolation_forest
    d = _base(tmp_path)
    d["target"] = {"shards": [str(DEMO_DIR / "target")]}
    d["scores"]["diffin"]["targets"] = ["target", "train", "self"]
    d["scores"]["diffin"]["form"] = "exact_increment"  # the component names below are this form's
    path = _write(tmp_path, d)
    cfg = load_config(path)
    rng = np.random.default_rng(0)
    names = ("loss", "clip_score", "sq_norm", "l1_feat", "tracin_target", "tracin_pred", "tracin_train", "t1_target",
             "t1_train", "t1_self")  # CheckpointScorer.compute's, exact_increment form
    comps = [{n: rng.random(4) for n in names}]
    features = rng.normal(size=(4, 8)).astype(np.float32)
    cols = combine_columns(cfg, [CheckpointWeights(10, 1e-2, -1e-6, 1e-3, 1e-3, 10)], fit_isolation_forest(features, trees=5),
                           comps, features, list("abcd"))
    written = sorted(c for c in cols if not c.startswith("c0_"))
    assert written == sorted(score_columns(cfg.scores.methods, cfg.scores.diffin.targets, True)) == \
        sorted(c for m in METHODS.values() for c in m.columns)
    for column in written:
        assert load_config(path, [f"select.score={column}"]).select.score == column


def test_auto_selection_resolves_to_the_default_pipeline(tmp_path):
    """select.score / filter_score auto: with a target set, diffin_target behind a filter stage on the proxy's loss
    (pruner.config.TARGET_FREE_SCORE); without one, the loss ranks and there is no filter stage; with no baselines
    among the methods, no filter stage and the first target score."""
    d = _base(tmp_path)
    d["select"] = {}
    d["scores"] = {}
    cfg = load_config(_write(tmp_path, d))
    assert (cfg.select.score, cfg.select.filter_score) == ("baseline_loss", None) == (TARGET_FREE_SCORE, None)
    d["target"] = {"shards": [str(DEMO_DIR / "target")]}
    cfg = load_config(_write(tmp_path, d))
    assert (cfg.select.score, cfg.select.filter_score) == ("diffin_target", "baseline_loss")
    d["scores"] = {"methods": ["tracin"]}
    cfg = load_config(_write(tmp_path, d))
    assert (cfg.select.score, cfg.select.filter_score) == ("tracin_target", None)


def test_policy_config_accepted(tmp_path):
    path = _write(tmp_path, _base(tmp_path))
    cfg = load_config(path, ["select.policy=class_balanced", "select.label_key=label", "features.save=false",
                             "select.dedup_threshold=0.995", "select.dedup_space=embedding"])
    assert cfg.select.uses_policy and not cfg.select.needs_features and cfg.select.keep_fraction == 0.5
    plain = load_config(path, ["select.threshold=0.1"]).select
    assert not plain.uses_policy and plain.n_clusters == 100 and plain.label_key == "classname"


def test_diffin_alone_forms_no_features_or_norms(tmp_path):
    from pruner.scorer import computed_quantities
    path = _write(tmp_path, _base(tmp_path))
    exact = "scores.diffin.form=exact_increment"
    alone = load_config(path, ["scores.methods=[diffin]", "features.save=false", exact])
    assert computed_quantities(alone) == (False, False)
    assert computed_quantities(load_config(path)) == (True, True)
    assert computed_quantities(load_config(path, ["scores.methods=[diffin, tracin]", "features.save=false", exact])) \
        == (False, True)
    # the propagated form (the default) reads the projected gradients, so it forms them even without features.save
    assert computed_quantities(load_config(path, ["scores.methods=[diffin]", "features.save=false"])) == (True, False)


def test_missing_paths_reported(tmp_path):
    d = _base(tmp_path)
    d["data"]["shards"] = [str(tmp_path / "nope.tar")]
    d["trajectory"]["file"] = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, d))
    msg = str(e.value)
    assert "data.shards.0" in msg and "trajectory.file" in msg and "train-proxy" in msg


def test_trajectory_checkpoints_must_exist(tmp_path):
    """The checkpoints of a trajectory file are found as the job finds them, relative to that file (here not the
    config's folder), and a missing one is reported under trajectory.file, as is a malformed file; a missing listed
    checkpoint is reported under its index."""
    traj = _trajectory(tmp_path / "proxy", "ckpt-10.pt", "ckpt-20.pt").resolve()
    d = _base(tmp_path)
    d["trajectory"]["file"] = str(traj)
    path = _write(tmp_path, d)
    assert load_config(path).trajectory.file == str(traj)
    (traj.parent / "ckpt-20.pt").unlink()
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert (f"  trajectory.file: trajectory file {traj} names checkpoint {traj.parent / 'ckpt-20.pt'}, which does "
            f"not exist (fix: keep the checkpoints beside the file") in str(e.value)
    traj.write_text("{}")
    with pytest.raises(ConfigError, match=r"trajectory.file: trajectory file .* is malformed \(KeyError"):
        load_config(path)
    listed = [str(traj.parent / "ckpt-10.pt"), str(traj.parent / "ckpt-20.pt")]
    with pytest.raises(ConfigError) as e:
        load_config(path, ["trajectory.file=null", f"trajectory.checkpoints={json.dumps(listed)}"])
    assert f"  trajectory.checkpoints.1: checkpoint {listed[1]} does not exist (fix:" in str(e.value)
    assert "trajectory.checkpoints.0" not in str(e.value)


def test_load_config_reads_no_weights(tmp_path):
    """load_config finds the checkpoints without loading them: it does not even import torch (the weights are read by
    the pre-flight check of validate-config and prune, check_checkpoint_weights)."""
    path = _write(tmp_path, _base(tmp_path))
    code = (f"import sys; from pruner.config import load_config; load_config({path!r}); "
            f"assert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("case", ["pickle", "nan", "arch"])
def test_bad_checkpoints_stop_validate_and_prune(tmp_path, case, capsys):
    """A checkpoint that carries pickled objects, holds NaN weights or was trained with another architecture fails
    `pruner validate-config` and `pruner prune` with exit status 2, the file and the fix, before any Ray work or job
    directory (it used to pass validation, then kill the Ray actors after the cluster had started)."""
    import argparse

    import ray
    d = _base(tmp_path)
    traj = tmp_path / "ckpt-10.pt"
    state = {k: v.clone() for k, v in _micro_state().items()}
    why = {"pickle": "cannot be read as a weights-only torch file", "nan": "contains NaN/Inf values",
           "arch": "does not fit model.arch 'pruner-tiny'"}[case]
    if case == "nan":
        state["visual.proj"][0, 0] = float("nan")
    ckpt = {"step": 10, "state_dict": state}
    if case == "pickle":
        ckpt["args"] = argparse.Namespace(lr=1)
    torch.save(ckpt, traj)
    if case == "arch":  # the trajectory file names no architecture: model.arch (default pruner-tiny) is used
        doc = json.loads((tmp_path / "trajectory.json").read_text())
        (tmp_path / "trajectory.json").write_text(json.dumps({"checkpoints": doc["checkpoints"]}))
    d["output_dir"] = str(tmp_path / "runs")
    path = _write(tmp_path, d)
    assert cli_main(["validate-config", path]) == 2
    err = capsys.readouterr().err
    assert f"trajectory.file: checkpoint {traj}" in err and why in err and "(fix: " in err, err
    assert cli_main(["prune", "--config", path]) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()


def test_local_shard_specs_must_match_shards(tmp_path):
    """Local directories, globs and brace patterns are expanded as the job expands them, and each must match a
    shard, also under a pattern over a missing folder; fsspec URLs are left to the job, so no network is needed."""
    pool = DEMO_DIR / "pool"
    (tmp_path / "empty").mkdir()
    bad = [str(tmp_path / "missing" / "shard-{0..3}.tar"), str(tmp_path / "missing" / "*.tar"), str(pool / "*.tar"),
           str(tmp_path / "empty")]
    d = _base(tmp_path)
    d["data"]["shards"] = [str(pool / "demo-pool-{000000..000001}.tar.gz"), str(pool / "*.tar.gz"),
                           "s3://no-such-bucket/shard-{0..3}.tar"]
    d["target"] = {"shards": bad}
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, d))
    assert str(e.value).splitlines()[1:] == [
        f"  target.shards.0: shard spec {bad[0]!r}: {tmp_path / 'missing' / 'shard-0.tar'} does not exist "
        f"(fix: check the path or brace range)"] + [
        f"  target.shards.{i}: shard spec {bad[i]!r} matches no .tar/.tar.gz/.tgz shard (fix: check the directory, "
        f"glob or brace pattern)" for i in (1, 2, 3)]
    del d["target"]
    assert load_config(_write(tmp_path, d)).data.shards == d["data"]["shards"]


def test_prune_stops_at_validation(tmp_path, capsys):
    """The audit's config (a select.score typo; a trajectory file naming a missing checkpoint): `pruner prune`
    stops before any Ray or model work with exit status 2 and the problem, as for other config errors."""
    traj = tmp_path / "trajectory.json"
    traj.write_text(json.dumps({"checkpoints": [{"path": "missing-ckpt.pt", "step": 10, "lr": 0.001}]}))
    path = _write(tmp_path, {"data": {"shards": [str(DEMO_DIR / "pool")]},
                             "target": {"shards": [str(DEMO_DIR / "target")]}, "trajectory": {"file": str(traj)},
                             "select": {"score": "tracin_targt"}})
    assert cli_main(["prune", "--config", path]) == 2
    assert "select.score 'tracin_targt' is not a score column" in capsys.readouterr().err
    assert cli_main(["prune", "--config", path, "--set", "select.score=tracin_target"]) == 2
    assert (f"trajectory.file: trajectory file {traj.resolve()} names checkpoint "
            f"{traj.resolve().parent / 'missing-ckpt.pt'}, which does not exist") in capsys.readouterr().err


def test_pipe_refused_unless_allowed(tmp_path):
    d = _base(tmp_path)
    d["data"]["shards"] = ["pipe:cat /etc/hostname"]
    with pytest.raises(ConfigError, match="pipe: URLs execute shell commands"):
        load_config(_write(tmp_path, d))
    d["data"]["allow_pipe"] = True
    assert load_config(_write(tmp_path, d)).data.allow_pipe


def test_target_required_for_target_influence(tmp_path):
    d = _base(tmp_path)
    d["scores"]["diffin"]["targets"] = ["target"]
    with pytest.raises(ConfigError, match="target.shards is empty"):
        load_config(_write(tmp_path, d))


def test_relative_paths_resolve_against_config_folder(tmp_path):
    sub = tmp_path / "cfg"
    _trajectory(sub, "ckpt-10.pt")
    d = {"data": {"shards": [str(DEMO_DIR / "pool")]}, "trajectory": {"file": "trajectory.json"},
         "scores": {"diffin": {"targets": ["train"]}}, "select": {"score": "diffin_train"}}
    cfg = load_config(_write(sub, d))
    assert cfg.trajectory.file == str((sub / "trajectory.json").resolve())


def test_fingerprint_ignores_operational_keys(tmp_path):
    path = _write(tmp_path, _base(tmp_path))
    a = load_config(path)
    b = load_config(path, ["ray.num_actors=1", "output_dir=/elsewhere", "name=other", "select.keep_fraction=0.3",
                           "select.policy=class_balanced"])  # select is re-derived from the stored scores
    c = load_config(path, ["features.k=512"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_cli_validate_config(tmp_path, capsys):
    path = _write(tmp_path, _base(tmp_path))
    assert cli_main(["validate-config", path]) == 0
    assert "valid" in capsys.readouterr().out
    assert cli_main(["validate-config", path, "--set", "features.bogus=1"]) == 2
    assert "features.bogus: unknown key" in capsys.readouterr().err


def test_job_config_keeps_the_sketch_of_old_jobs(tmp_path):
    """A job's config.yaml written before features.single_token_k / single_token_direct / scores.diffin.base_pass
    existed re-opens with the values that job used (Kronecker sketch everywhere or Khatri-Rao blocks through R,
    exact base pass), so rescore/explain extend its stored features with the same projection; keys the file sets
    are kept, and new configs get the new defaults."""
    old = {"data": {"shards": ["/nowhere/pool"]}, "trajectory": {"file": "/nowhere/trajectory.json"},
           "scores": {"diffin": {"targets": ["train"]}}, "select": {"score": "diffin_train"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_job_config(tmp_path / "config.yaml")
    assert cfg.features.single_token_k == 0 and cfg.scores.diffin.base_pass == "exact"
    assert not cfg.features.single_token_direct and cfg.scores.diffin.form == "taylor"
    old["features"] = {"single_token_k": 256}  # a job of the Khatri-Rao sketch before its blocks skipped R
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    reopened = load_job_config(tmp_path / "config.yaml").features
    assert reopened.single_token_k == 256 and not reopened.single_token_direct
    fresh = load_config(data={k: v for k, v in old.items() if k != "features"}, check_paths=False)
    assert fresh.features.single_token_k is None and fresh.scores.diffin.base_pass == "midpoint"
    assert fresh.features.single_token_direct and fresh.scores.diffin.form == "propagated"


def test_save_hzg_needs_the_taylor_form(tmp_path):
    """P H_z G_B is a term of the taylor form only: asking to store it with the default exact_increment form is
    refused with the fix; with form taylor it is accepted."""
    base = {"data": {"shards": ["/nowhere/pool"]}, "trajectory": {"file": "/nowhere/trajectory.json"},
            "scores": {"diffin": {"targets": ["train"]}}, "select": {"score": "diffin_train"},
            "features": {"save_hzg": True}}
    with pytest.raises(ConfigError, match="save_hzg.*form: taylor"):
        load_config(data=base, check_paths=False)
    base["scores"]["diffin"]["form"] = "taylor"
    assert load_config(data=base, check_paths=False).features.save_hzg
