"""pruner.model.checkpoints on real open_clip models and real files: OpenCLIP checkpoints (with and without the DDP
``module.`` prefix), bare state dicts, trajectory files, and the errors for bad inputs."""
import argparse
import json

import pytest
import torch

from pruner.model.checkpoints import CheckpointInfo, load_scoring_model, load_state_dict, load_trajectory
from pruner.model.clip import create_clip


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_clip("pruner-micro")[0]


def save_open_clip(path, model, epoch, lr, step=None, prefix=""):
    """An OpenCLIP training checkpoint as open_clip_train.main writes it (plus ``step`` when given)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ckpt = {"epoch": epoch, "name": "run", "optimizer": opt.state_dict(),
            "state_dict": {prefix + k: v for k, v in model.state_dict().items()}}
    if step is not None:
        ckpt["step"] = step
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_open_clip_checkpoints_load_with_step_lr_and_weights(tmp_path, micro, prefix):
    a = save_open_clip(tmp_path / "epoch_1.pt", micro, epoch=1, lr=3e-4, prefix=prefix)
    b = save_open_clip(tmp_path / "epoch_2.pt", micro, epoch=2, lr=1e-4, step=250, prefix=prefix)
    traj = load_trajectory(checkpoints=[a, b])
    assert traj.checkpoints == (CheckpointInfo(a, 1, 3e-4, None), CheckpointInfo(b, 250, 1e-4, None))
    assert [c.step_from for c in traj.checkpoints] == ["epoch", "step"]
    assert traj.arch is None and traj.lr_schedule is None

    sd = load_state_dict(b)
    assert set(sd) == set(micro.state_dict()) and all(torch.equal(sd[k], v) for k, v in micro.state_dict().items())
    model = load_scoring_model(traj.checkpoints[1], "pruner-micro")
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())


def test_scoring_model_matches_the_trained_weights(tmp_path, micro):
    path = save_open_clip(tmp_path / "c.pt", micro, epoch=1, lr=1e-3, prefix="module.")
    model = load_scoring_model(path, "pruner-micro")
    x, text = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))
    micro.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), micro.encode_image(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(text), micro.encode_text(text), rtol=1e-5, atol=1e-5)


def test_bare_state_dict(tmp_path, micro):
    p = tmp_path / "bare.pt"
    torch.save(micro.state_dict(), p)
    assert set(load_state_dict(str(p))) == set(micro.state_dict())
    (info,) = load_trajectory(checkpoints=[str(p)]).checkpoints  # one checkpoint: weight is a global constant
    assert (info.step, info.lr) == (1, 1.0)
    torch.save(micro.state_dict(), tmp_path / "bare2.pt")
    with pytest.raises(ValueError, match=r"bare\.pt records no step/epoch.*trajectory file"):
        load_trajectory(checkpoints=[str(p), str(tmp_path / "bare2.pt")])


def test_trajectory_file_paths_are_relative_to_the_file(tmp_path, micro):
    (tmp_path / "ck").mkdir()
    save_open_clip(tmp_path / "ck" / "s10.pt", micro, epoch=0, lr=2e-4, step=10)
    torch.save(micro.state_dict(), tmp_path / "ck" / "s20.pt")  # entries may point to bare state dicts
    doc = {"arch": "pruner-micro", "config_file": None, "optimizer": "adamw", "seed": 3, "total_steps": 20,
           "pool_size": 640, "lr_schedule": [1e-4] * 20,
           "checkpoints": [{"path": "ck/s10.pt", "step": 10, "lr": 2e-4, "lr_mean": 1.5e-4},
                           {"path": "ck/s20.pt", "step": 20, "lr": 1e-5, "lr_mean": None}]}
    (tmp_path / "trajectory.json").write_text(json.dumps(doc))
    traj = load_trajectory(file=str(tmp_path / "trajectory.json"))
    assert [c.path for c in traj.checkpoints] == [str(tmp_path / "ck" / "s10.pt"), str(tmp_path / "ck" / "s20.pt")]
    assert [c.lr_mean for c in traj.checkpoints] == [1.5e-4, None]
    assert (traj.arch, traj.seed, traj.pool_size, traj.total_steps, len(traj.lr_schedule)) == ("pruner-micro", 3,
                                                                                                 640, 20, 20)
    doc["checkpoints"].reverse()
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"bad\.json: steps must increase strictly.*s10\.pt \(step 10\)"):
        load_trajectory(file=str(tmp_path / "bad.json"))
    doc["checkpoints"][0]["path"] = "ck/gone.pt"
    (tmp_path / "gone.json").write_text(json.dumps(doc))
    with pytest.raises(FileNotFoundError, match=r"gone\.pt, which does not exist"):
        load_trajectory(file=str(tmp_path / "gone.json"))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"trajectory file .*nope\.json does not exist.*train-proxy"):
        load_trajectory(file=str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*missing\.pt does not exist"):
        load_trajectory(checkpoints=[str(tmp_path / "missing.pt")])
    with pytest.raises(FileNotFoundError, match=r"missing\.pt does not exist"):
        load_scoring_model(str(tmp_path / "missing.pt"), "pruner-micro")


def test_non_increasing_steps(tmp_path, micro):
    a = save_open_clip(tmp_path / "a.pt", micro, epoch=2, lr=1e-4)
    b = save_open_clip(tmp_path / "b.pt", micro, epoch=2, lr=1e-4)
    with pytest.raises(ValueError, match=r"steps must increase strictly.*b\.pt \(step 2\) follows .*a\.pt"):
        load_trajectory(checkpoints=[a, b])


def test_wrong_architecture_names_file_and_fix(tmp_path, micro):
    path = save_open_clip(tmp_path / "micro.pt", micro, epoch=1, lr=1e-4)
    with pytest.raises(ValueError, match=r"micro\.pt does not fit model\.arch 'pruner-tiny'.*fix: set model\.arch"):
        load_scoring_model(path, "pruner-tiny")
    sd = dict(micro.state_dict())
    sd.pop("logit_scale")
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt does not fit.*missing \['logit_scale'\]"):
        load_scoring_model(str(tmp_path / "partial.pt"), "pruner-micro")


def test_nan_tensor_is_named(tmp_path, micro):
    sd = {k: v.clone() for k, v in micro.state_dict().items()}
    sd["visual.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save({"epoch": 1, "state_dict": sd, "optimizer": {"param_groups": [{"lr": 1e-4}]}}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan\.pt: tensor 'visual\.conv1\.weight' contains NaN/Inf"):
        load_scoring_model(str(tmp_path / "nan.pt"), "pruner-micro")


def test_pickled_objects_are_refused(tmp_path, micro):
    torch.save({"epoch": 1, "state_dict": micro.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "o.pt")
    with pytest.raises(ValueError, match=r"o\.pt cannot be read as a weights-only torch file"):
        load_state_dict(str(tmp_path / "o.pt"))


def test_exact_increment_refuses_epoch_steps(tmp_path, micro):
    """Diff-In's default form weighs its second-order term by t * eta against the first-order one, so an epoch count
    (or a bare state dict's default step 1) in place of the global step would bias it; the taylor form and TracIn
    only scale by it and accept such checkpoints."""
    from pruner.config import JobConfig
    from pruner.scores.weights import checkpoint_weights
    a = save_open_clip(tmp_path / "epoch_1.pt", micro, epoch=1, lr=3e-4)
    b = save_open_clip(tmp_path / "epoch_2.pt", micro, epoch=2, lr=1e-4, step=250)
    traj = load_trajectory(checkpoints=[a, b])
    base = {"data": {"shards": [str(tmp_path)]}, "target": {"shards": [str(tmp_path)]}}
    cfg = JobConfig.model_validate({**base, "trajectory": {"checkpoints": [a, b]}})
    with pytest.raises(ValueError, match=r"epoch_1\.pt records no optimiser step.*its epoch.*fix:"):
        checkpoint_weights(cfg, traj)
    taylor = cfg.model_copy(update={"scores": cfg.scores.model_copy(update={"diffin": cfg.scores.diffin.model_copy(
        update={"form": "taylor"})})})
    assert [w.step for w in checkpoint_weights(taylor, traj)] == [1, 250]
    assert len(checkpoint_weights(JobConfig.model_validate({**base, "trajectory": {"checkpoints": [b]}}),
                                  load_trajectory(checkpoints=[b]))) == 1


def test_checkpoint_weights_sum_over_the_updates_each_checkpoint_stands_for(tmp_path):
    """A checkpoint stands for the updates since the previous one: TracIn's eta_i is their summed step size (Pruthi
    et al.), Diff-In's a_t and b_t sum its per-update increments (methods §1.2). Unevenly spaced checkpoints are
    weighted by their intervals; evenly spaced ones keep the per-checkpoint ratios of the published forms;
    appending a checkpoint leaves the earlier weights unchanged; a checkpoint at step 0 is refused."""
    import math

    from pruner.config import JobConfig
    from pruner.model.checkpoints import Trajectory
    from pruner.scores.weights import checkpoint_weights
    cfg = JobConfig.model_validate({"data": {"shards": [str(tmp_path)]}, "target": {"shards": [str(tmp_path)]},
                                    "trajectory": {"checkpoints": ["unused.pt"], "pool_size": 100}})
    uneven = (CheckpointInfo("a", 10, 1e-3, 2e-3), CheckpointInfo("b", 11, 1e-3, 1e-3),
              CheckpointInfo("c", 40, 1e-4, 5e-4))
    w = checkpoint_weights(cfg, Trajectory(uneven))
    assert [x.updates for x in w] == [10, 1, 29]
    for x, (t, lr, n) in zip(w, [(10, 2e-3, 10), (11, 1e-3, 1), (40, 5e-4, 29)]):  # lr: the interval mean
        assert math.isclose(x.eta, lr * n) and math.isclose(x.a_t, -t * lr ** 2 * n / 100)
        assert math.isclose(x.b_t, lr * n / 100) and x.lr == lr
    assert w[1].eta < w[0].eta / 10  # one update after the previous checkpoint: a small share, not a full one
    assert checkpoint_weights(cfg, Trajectory(uneven[:2])) == w[:2]
    even = checkpoint_weights(cfg, Trajectory(tuple(CheckpointInfo(str(t), t, 1.0, lr)
                                                    for t, lr in [(10, 3e-3), (20, 2e-3), (30, 1e-3)])))
    for x, (t, lr) in zip(even, [(10, 3e-3), (20, 2e-3), (30, 1e-3)]):  # a common factor (10) on every weight
        assert math.isclose(x.eta / even[0].eta, lr / 3e-3)
        assert math.isclose(x.a_t / even[0].a_t, t * lr ** 2 / (10 * 9e-6))
    with pytest.raises(ValueError, match=r"checkpoint init is at step 0: it stands for no optimiser update.*fix:"):
        checkpoint_weights(cfg, Trajectory((CheckpointInfo("init", 0, 1e-3, None), uneven[0])))


def test_prune_refuses_a_step_0_checkpoint_with_exit_1(tmp_path, micro_trajectory, capsys):
    """`pruner prune` over a trajectory that starts at the initialisation exits 1 with the fix, before any job
    directory exists (no traceback)."""
    import yaml

    from conftest import small_job_config
    from pruner.cli.prune import main
    doc = json.loads(micro_trajectory.read_text())
    doc["checkpoints"][0]["step"] = 0
    doc["checkpoints"] = [{**c, "path": str(micro_trajectory.parent / c["path"])} for c in doc["checkpoints"]]
    (tmp_path / "trajectory.json").write_text(json.dumps(doc))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(small_job_config(tmp_path, tmp_path / "trajectory.json")))
    assert main(["--config", str(cfg)]) == 1
    assert "stands for no optimiser update" in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()
