"""Shared fixtures: Ray bound to loopback without auth, and a small real proxy trajectory on the demo data."""
from __future__ import annotations

import json
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
    """A real pruner-micro trajectory trained on the demo pool (AdamW, constant LR). Returns trajectory.json."""
    import torch

    from pruner.io.shards import demo_pool_shards, read_shard
    from pruner.model.clip import create_clip
    from pruner.model.loss import clip_batch_loss, encode_pairs

    torch.manual_seed(seed)
    model, preprocess, tokenizer = create_clip("pruner-micro")
    samples = [s for url in demo_pool_shards()[:2] for s in read_shard(url)[0]]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out.mkdir(parents=True, exist_ok=True)
    every = steps // checkpoints
    entries = []
    for step in range(1, steps + 1):
        batch = samples[(step * 32) % (len(samples) - 32):][:32]
        img, txt = encode_pairs(model, torch.stack([preprocess(s.image) for s in batch]),
                                tokenizer([s.caption for s in batch]))
        loss = clip_batch_loss(img, txt, model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            torch.save({"state_dict": model.state_dict(), "step": step}, out / f"step{step}.pt")
            entries.append({"path": f"step{step}.pt", "step": step, "lr": 1e-3, "lr_mean": 1e-3})
    path = out / "trajectory.json"
    path.write_text(json.dumps({"arch": "pruner-micro", "checkpoints": entries, "pool_size": len(samples)}))
    return path


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
        "scores": {"diffin": {"targets": ["target", "train"], "reference_batch_size": 32},
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
