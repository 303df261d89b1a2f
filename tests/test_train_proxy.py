"""pruner train-proxy: short real open_clip_train runs (pruner-micro, CPU) on real WebDataset shards, whose
checkpoints and trajectory must load with pruner.model.checkpoints."""
import json
import tarfile
from pathlib import Path

import pytest
import torch

from pruner.model.checkpoints import load_scoring_model, load_state_dict, load_trajectory
from pruner.cli.train_proxy import main
from pruner.train.proxy import checkpoint_steps, count_samples, expand_shards, pretrained_source, train_proxy

ROOT = Path(__file__).resolve().parents[1]
POOLS = [ROOT / "pruner" / "demo" / "pool", ROOT.parent / "shared" / "data" / "cifar10" / "train"]
POOL = next((p for p in POOLS if p.is_dir() and any(p.glob("*.tar*"))), None)
needs_pool = pytest.mark.skipif(POOL is None, reason="no demo pool or shared CIFAR-10 shards")
STEPS = 30
KW = dict(arch="pruner-micro", steps=STEPS, batch_size=32, checkpoints=3, max_shards=1, seed=0, log_every=10)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, 2 threads spin against other processes (3x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("proxy")
    return out, train_proxy([str(POOL)], str(out), **KW)


@needs_pool
def test_trajectory_checkpoints_and_lr_records(run):
    out, traj = run
    assert [c.step for c in traj.checkpoints] == [10, 20, 30]
    assert (traj.arch, traj.optimizer, traj.seed, traj.total_steps) == ("pruner-micro", "adamw", 0, STEPS)
    doc = json.loads((out / "trajectory.json").read_text())
    assert traj.pool_size == count_samples(doc["train"]["shards"]) > 0 and len(doc["train"]["shards"]) == 1
    sched = traj.lr_schedule
    assert len(sched) == STEPS and max(sched) == pytest.approx(3e-4) and sched[0] < sched[3] and sched[-1] < 1e-5
    prev = 0
    for c in traj.checkpoints:
        assert c.lr == sched[c.step - 1] and c.lr_mean == pytest.approx(sum(sched[prev:c.step]) / (c.step - prev))
        prev = c.step
    assert not list((out / "train" / "checkpoints").glob("epoch_*.pt"))  # open_clip's duplicate of the last step


@needs_pool
def test_checkpoints_load_as_open_clip_checkpoints_and_scoring_models(run):
    out, traj = run
    listed = load_trajectory(checkpoints=[c.path for c in traj.checkpoints])  # the OpenCLIP-checkpoint route
    assert [(c.step, c.lr) for c in listed.checkpoints] == [(c.step, c.lr) for c in traj.checkpoints]
    x = torch.randn(2, 3, 32, 32)
    embeddings = []
    for c in traj.checkpoints:
        with torch.no_grad():
            embeddings.append(load_scoring_model(c, traj.arch).encode_image(x))
        assert torch.isfinite(embeddings[-1]).all()
    assert not torch.allclose(embeddings[0], embeddings[-1])  # the weights moved between checkpoints


@needs_pool
def test_loss_decreases(run):
    out, _ = run
    losses = [c["train_loss"] for c in json.loads((out / "trajectory.json").read_text())["checkpoints"]]
    assert losses[-1] < losses[0] and losses[0] < torch.log(torch.tensor(32.0)).item() + 0.5


@needs_pool
def test_same_seed_gives_identical_weights(run, tmp_path):
    _, traj = run
    again = train_proxy([str(POOL)], str(tmp_path / "again"), **KW)
    a, b = load_state_dict(traj.checkpoints[-1].path), load_state_dict(again.checkpoints[-1].path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert again.lr_schedule == traj.lr_schedule


@needs_pool
def test_sgd_cli_and_existing_output(tmp_path):
    argv = ["--shards", str(POOL), "--out", str(tmp_path / "sgd"), "--arch", "pruner-micro", "--steps", "4",
            "--optimizer", "sgd", "--lr", "0.01", "--checkpoint-steps", "2,4", "--max-shards", "1"]
    assert main(argv) == 0
    traj = load_trajectory(file=str(tmp_path / "sgd" / "trajectory.json"))
    assert traj.optimizer == "sgd" and [c.step for c in traj.checkpoints] == [2, 4]
    opt = torch.load(traj.checkpoints[-1].path, map_location="cpu", weights_only=True)["optimizer"]
    assert opt["param_groups"][0]["momentum"] == 0.9
    assert any("momentum_buffer" in s for s in opt["state"].values())
    with pytest.raises(FileExistsError, match="already holds a training run"):
        main(argv)


def test_checkpoint_steps():
    assert checkpoint_steps(300, even=3) == [100, 200, 300]
    mixed = checkpoint_steps(300, even=2, random_count=3, seed=1)
    assert len(mixed) == 5 and {150, 300} <= set(mixed) and mixed == checkpoint_steps(300, 2, 3, 1)
    assert checkpoint_steps(10, explicit=[7, 3]) == [3, 7]
    with pytest.raises(ValueError, match=r"must lie in \[1, 10\].*\[0, 11\]"):
        checkpoint_steps(10, explicit=[0, 5, 11])


def test_expand_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar/.tar.gz shards found"):
        expand_shards([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"shard .*x\.tar does not exist"):
        expand_shards([str(tmp_path / "x.tar")])


@needs_pool
def test_config_file_names_the_architecture(tmp_path, capfd):
    """`--config-file my-micro.json` without --arch trains that config and records its name (open_clip names a config
    by its file name; it used to train pruner-tiny silently); a different --arch is refused before any training; a
    job config with model.config_file takes its arch the same way."""
    from pruner.config import ConfigError, load_config
    from pruner.model.clip import CONFIG_DIR
    cfg_file = tmp_path / "my-micro.json"
    cfg_file.write_text((CONFIG_DIR / "pruner-micro.json").read_text())
    assert main(["--shards", str(POOL), "--out", str(tmp_path / "p"), "--config-file", str(cfg_file), "--steps", "2",
                 "--checkpoints", "1", "--max-shards", "1", "--batch-size", "8"]) == 0
    doc = json.loads((tmp_path / "p" / "trajectory.json").read_text())
    assert doc["arch"] == "my-micro" and doc["config_file"] == str(cfg_file)
    # the console shows train-proxy's progress, not open_clip_train's model and argument dump (kept in its out.log)
    console = "".join(capfd.readouterr())
    assert "train-proxy saved step_00000002.pt" in console and "Params:" not in console and "CLIP(" not in console
    assert "Params:" in (tmp_path / "p" / "train" / "out.log").read_text()
    sd = load_state_dict(str(tmp_path / "p" / doc["checkpoints"][0]["path"]))
    assert sd["visual.proj"].shape == (64, 32)  # pruner-micro's width 64 -> embed 32, not pruner-tiny's
    with pytest.raises(ValueError, match="--arch pruner-tiny does not match --config-file .*my-micro.json"):
        main(["--shards", str(POOL), "--out", str(tmp_path / "q"), "--config-file", str(cfg_file),
              "--arch", "pruner-tiny"])
    assert not (tmp_path / "q").exists()
    base = {"data": {"shards": [str(POOL)]}, "trajectory": {"file": str(tmp_path / "p" / "trajectory.json")},
            "model": {"config_file": str(cfg_file)}}
    assert load_config(data=base).model.arch == "my-micro"
    with pytest.raises(ConfigError, match="arch 'pruner-tiny' does not match config_file"):
        load_config(data={**base, "model": {"config_file": str(cfg_file), "arch": "pruner-tiny"}})


@needs_pool
def test_pretrained_checkpoint_is_the_start(run, tmp_path):
    """`--pretrained <checkpoint>` starts from those weights: at LR 0 (AdamW's decoupled decay scales with the LR,
    so nothing moves) the fine-tune's checkpoint equals the pretrained one exactly, where a run from scratch differs;
    the trajectory records the resolved file. A checkpoint of another architecture, or a name that is neither a file
    nor a tag, is refused before anything is written."""
    out, traj = run
    start = traj.checkpoints[-1].path
    argv = ["--shards", str(POOL), "--out", str(tmp_path / "ft"), "--arch", "pruner-micro", "--steps", "2",
            "--lr", "0", "--checkpoint-steps", "2", "--max-shards", "1", "--pretrained", start]
    assert main(argv) == 0
    ft = load_trajectory(file=str(tmp_path / "ft" / "trajectory.json"))
    a, b = load_state_dict(start), load_state_dict(ft.checkpoints[-1].path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert main(argv[:-2] + ["--out", str(tmp_path / "scratch")]) == 0
    scratch = load_state_dict(load_trajectory(file=str(tmp_path / "scratch" / "trajectory.json")).checkpoints[-1].path)
    assert not torch.equal(scratch["visual.proj"], b["visual.proj"])
    doc = json.loads((tmp_path / "ft" / "trajectory.json").read_text())
    assert doc["train"]["pretrained"] == str(Path(start).resolve())
    assert json.loads((out / "trajectory.json").read_text())["train"]["pretrained"] is None

    from pruner.model.clip import create_clip
    tiny = tmp_path / "tiny.pt"
    torch.save({"state_dict": create_clip("pruner-tiny")[0].state_dict()}, tiny)
    with pytest.raises(ValueError, match=r"--pretrained: checkpoint .*tiny\.pt does not fit model\.arch "
                                         r"'pruner-micro': .*other shapes"):
        train_proxy([str(POOL)], str(tmp_path / "bad"), **{**KW, "pretrained": str(tiny)})
    with pytest.raises(ValueError, match=r"--pretrained 'nope' is neither an open_clip pretrained tag of pruner-micro "
                                         r"nor a file \(fix: give a checkpoint file"):
        train_proxy([str(POOL)], str(tmp_path / "bad"), **{**KW, "pretrained": "nope"})
    assert not (tmp_path / "bad").exists()


def test_pretrained_tags_that_scoring_would_not_reproduce():
    """open_clip tags (no download: only their recorded configs are read): accepted in any spelling when the scoring
    model (the architecture without pretrained weights) has the tag's activation and preprocessing; refused, with
    the tags that fit, when they differ (OpenAI's QuickGELU weights on ViT-B-32, ViT-L-14's laion2b mean/std of 0.5)
    or for SigLIP."""
    assert pretrained_source("ViT-B-32", "LAION2B-S34B-B79K") == "laion2b_s34b_b79k"
    assert pretrained_source("ViT-B-32-quickgelu", "openai") == "openai"
    assert pretrained_source("ViT-B-32", None) is None
    with pytest.raises(ValueError, match=r"openai: trained with QuickGELU, unlike --arch ViT-B-32 \(fix: another tag "
                                         r"of ViT-B-32: \[.*'laion2b_s34b_b79k'.*\], or --arch ViT-B-32-quickgelu\)"):
        pretrained_source("ViT-B-32", "openai")
    with pytest.raises(ValueError, match=r"laion2b_s32b_b82k: trained with other image preprocessing .*mean "
                                         r"\(0\.5, 0\.5, 0\.5\) vs"):
        pretrained_source("ViT-L-14", "laion2b_s32b_b82k")
    with pytest.raises(ValueError, match="SigLIP model"):
        pretrained_source("ViT-B-16-SigLIP", "webli")


def test_shards_without_pairs_are_refused(tmp_path):
    """A shard with no image-caption pair is refused up front (open_clip_train would wait forever for a batch)."""
    (tmp_path / "a.txt").write_text("a caption without an image")
    with tarfile.open(tmp_path / "bad.tar", "w") as tf:
        tf.add(tmp_path / "a.txt", arcname="a.txt")
    with pytest.raises(ValueError, match=r"no image-caption pairs .*bad\.tar.*fix: check --shards"):
        train_proxy([str(tmp_path / "bad.tar")], str(tmp_path / "out"), **{**KW, "max_shards": None})
    assert not (tmp_path / "out").exists()
