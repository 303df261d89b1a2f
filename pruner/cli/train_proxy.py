"""``pruner train-proxy --shards ... --out ...``: train a proxy CLIP trajectory with OpenCLIP's trainer
(:func:`pruner.train.proxy.train_proxy`) and print the path of its trajectory.json."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from pruner.cli import COMMANDS
from pruner.logs import setup_console
from pruner.train.proxy import train_proxy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pruner train-proxy", description=COMMANDS["train-proxy"][1])
    p.add_argument("--shards", nargs="+", required=True, help="pool shards: files, folders or globs")
    p.add_argument("--out", required=True, help="output folder (trajectory.json, train/checkpoints/)")
    p.add_argument("--arch", help="pruner-tiny (default), pruner-micro or an open_clip name (ViT-B-32); with "
                   "--config-file, its file name")
    p.add_argument("--config-file", help="custom open_clip model JSON config (its file stem is the arch name)")
    p.add_argument("--steps", type=int, default=300, help="optimiser updates")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay (default steps/10)")
    p.add_argument("--wd", type=float, default=0.1, help="weight decay")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--checkpoints", type=int, default=3, help="evenly spaced checkpoints (the last at --steps)")
    p.add_argument("--random-checkpoints", type=int, default=0, help="extra checkpoints at random steps (seeded)")
    p.add_argument("--checkpoint-steps", help="explicit comma-separated steps, replacing the two options above")
    p.add_argument("--max-shards", type=int, help="train on this many shards drawn at random (seeded); default all")
    p.add_argument("--pool-size", type=int, help="N for a_t (default: samples in the training shards, counted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", help="start from these weights instead of from scratch: an open_clip pretrained "
                   "tag of --arch (e.g. laion2b_s34b_b79k for ViT-B-32; downloaded) or a local checkpoint file")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", default="auto", help="auto (amp on CUDA, fp32 on CPU) or an open_clip precision")
    p.add_argument("--workers", type=int, help="data loader processes (default 0 on CPU, up to 4 on CUDA)")
    p.add_argument("--log-every", type=int, default=10, help="log a progress line every N steps")
    p.add_argument("--threads", type=int, help="torch intra-op threads (on a busy small CPU, 1 can be much faster)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    setup_console()
    traj = train_proxy(
        a.shards, a.out, arch=a.arch, config_file=a.config_file, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
        warmup=a.warmup, weight_decay=a.wd, optimizer=a.optimizer, momentum=a.momentum, checkpoints=a.checkpoints,
        random_checkpoints=a.random_checkpoints, max_shards=a.max_shards, pool_size=a.pool_size, seed=a.seed,
        pretrained=a.pretrained,
        checkpoint_at=[int(s) for s in a.checkpoint_steps.split(",")] if a.checkpoint_steps else None,
        device=a.device, precision=a.precision, workers=a.workers, log_every=a.log_every)
    print(str(Path(a.out).resolve() / "trajectory.json"), f"({len(traj.checkpoints)} checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
