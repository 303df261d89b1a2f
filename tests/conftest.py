"""Shared fixtures: Ray bound to loopback without auth, and a small real proxy trajectory on the demo data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray on these machines: loopback only, no token auth, no usage stats (see README "Testing").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "cifar10"


def train_micro_trajectory(out: Path, steps: int = 30, checkpoints: int = 3, seed: int = 0) -> Path:
    """A real pruner-micro trajectory trained by `pruner train-proxy` on two demo shards. Returns trajectory.json."""
    from pruner.io.shards import demo_pool_shards
    from pruner.train.proxy import train_proxy

    train_proxy(demo_pool_shards()[:2], str(out), arch="pruner-micro", steps=steps, batch_size=32,
                checkpoints=checkpoints, seed=seed, device="cpu")
    return out / "trajectory.json"


@pytest.fixture(scope="session")
def micro_trajectory(tmp_path_factory) -> Path:
    return train_micro_trajectory(tmp_path_factory.mktemp("trajectory"))


def small_job_config(tmp: Path, trajectory: Path, **overrides) -> dict:
    """A fast job config on the demo data (pruner-micro, small bank, 2 CPU actors)."""
    from pruner.io.shards import DEMO_DIR
    cfg = {
        "name": "test", "output_dir": str(tmp / "jobs"), "seed": 0,
        "data": {"shards": [str(DEMO_DIR / "pool")]},
        "target": {"shards": [str(DEMO_DIR / "target")], "max_samples": 64},
        "model": {"arch": "pruner-micro"},
        "trajectory": {"file": str(trajectory)},
        "features": {"k": 128, "layer_k": 8, "bank_size": 128, "batch_size": 50},
        "scores": {"diffin": {"targets": ["target", "train"], "reference_batch_size": 32, "curvature_samples": 32},
                   "oga": {"iforest_sample": 100, "iforest_trees": 50}},
        "select": {"score": "diffin_target", "keep_fraction": 0.5},
        "ray": {"num_actors": 2},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            cfg.setdefault(section, {})[name] = value
        else:
            cfg[section] = value
    return cfg


def copy_job(job_root: Path, dest: Path, overrides: list[str]):
    """(a copy ``dest/<job name>`` of a finished job's directory without its keep set, explain results and clusters,
    its config with ``overrides``, the pool's shard URLs): for re-running the reduce step with other settings."""
    import shutil

    from pruner.config import load_config
    from pruner.io.shards import expand_shard_specs
    root = dest / job_root.name
    shutil.copytree(job_root, root, ignore=shutil.ignore_patterns("keep*", "explain", "clusters.*"))
    cfg = load_config(root / "config.yaml", overrides, check_paths=False)
    return root, cfg, expand_shard_specs(cfg.data.shards)


@pytest.fixture(autouse=True, scope="module")
def _private_ray_per_module():
    """Jobs run in-process start a private local Ray and keep it for the rest of the process (pruner.distributed.
    driver.connect_ray). Shut it down after each test module, so modules that start or join their own clusters
    begin with no Ray instance in this process."""
    yield
    import ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a small shared CPU, OpenMP barrier stalls make multi-threaded runs of
    the tiny models 10x slower. Restored afterwards."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
