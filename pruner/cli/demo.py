"""``pruner demo [--output runs/demo]``: the whole job on the embedded demo data (pruner/demo: CIFAR-10 pairs) on a
local Ray instance: train a proxy trajectory (once), write the demo job's YAML, prune with the default pipeline."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from pruner.cli import COMMANDS
from pruner.config import load_config
from pruner.io.shards import DEMO_DIR

DEMO_ROOT = Path("runs/demo")


def demo_config(root: Path, trajectory: Path) -> dict:
    """The demo job: the embedded CIFAR-10 subset, a proxy trajectory trained on it, local Ray, 2 CPU actors."""
    return {
        "name": "demo", "output_dir": str(root / "jobs"), "seed": 0,
        "data": {"shards": [str(DEMO_DIR / "pool")]},
        "target": {"shards": [str(DEMO_DIR / "target")], "max_samples": 200},
        "model": {"arch": "pruner-micro"},
        "trajectory": {"file": str(trajectory)},
        "features": {"k": 256, "bank_size": 256, "batch_size": 50},
        "scores": {"diffin": {"targets": ["target", "train"], "reference_batch_size": 64},
                   "oga": {"iforest_sample": 200}},
        "select": {"keep_fraction": 0.5},  # the default pipeline: loss filter stage, niche test, diffin_target
        "ray": {"num_actors": 2},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pruner demo", description=COMMANDS["demo"][1])
    ap.add_argument("--output", default=str(DEMO_ROOT), help="folder of the proxy, the job YAML and the job")
    ap.add_argument("--proxy-steps", type=int, default=150)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a job config key")
    args = ap.parse_args(argv)
    from pruner.jobs.prune import run
    from pruner.train.proxy import train_proxy

    root = Path(args.output)
    traj = root / "proxy" / "trajectory.json"
    if not traj.exists():
        print(f"pruner demo: training the proxy trajectory into {traj.parent}", flush=True)
        done = train_proxy([str(DEMO_DIR / "pool")], str(traj.parent), arch="pruner-micro", steps=args.proxy_steps,
                           checkpoints=3, batch_size=32, seed=0)
        print(f"pruner demo: {traj.resolve()} ({len(done.checkpoints)} checkpoints)", flush=True)
    cfg_path = root / "job.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(demo_config(root.resolve(), traj.resolve()), sort_keys=False))
    cfg = load_config(cfg_path, args.set)
    status, summary = run(cfg)
    if status == 0:
        print(json.dumps({k: summary[k] for k in ("counts", "rejects_by_reason", "score")}, indent=2))
    return status
