"""``pruner materialize keep/manifest.json out/``: write a finished job's kept samples into new WebDataset tar
shards (pruner's or DataComp's / img2dataset's names, with their stats and sizes.json)."""
from __future__ import annotations

import argparse
import json

from pruner.cli import COMMANDS
from pruner.io.manifests import materialize


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pruner materialize", description=COMMANDS["materialize"][1])
    ap.add_argument("manifest", help="keep/manifest.json of a finished job")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--samples-per-shard", type=int, default=10000)
    ap.add_argument("--max-shard-bytes", type=int, default=None)
    ap.add_argument("--naming", choices=["pruned", "datacomp"], default="pruned",
                    help="output names: pruned-000000.tar, ... or DataComp's / img2dataset's 00000000.tar, ... (each "
                         "with <name>_stats.json and <name>.parquet, plus sizes.json)")
    args = ap.parse_args(argv)
    counts = materialize(args.manifest, args.out, samples_per_shard=args.samples_per_shard,
                         max_shard_bytes=args.max_shard_bytes, naming=args.naming)
    print(json.dumps(counts, indent=2, default=str))
    return 0
