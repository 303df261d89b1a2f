"""``pruner validate-config job.yaml [--set key=value ...]``: check a job config (every key, with the fix for each
problem) and its checkpoints (loadable with weights_only, the configured architecture, finite), then exit."""
from __future__ import annotations

import argparse
import sys

from pruner.cli import COMMANDS
from pruner.config import ConfigError, check_checkpoint_weights, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pruner validate-config", description=COMMANDS["validate-config"][1])
    ap.add_argument("config", help="job YAML")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (repeatable)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        check_checkpoint_weights(cfg)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.config}: valid (fingerprint {cfg.fingerprint()})")
    return 0
