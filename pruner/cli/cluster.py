"""``pruner cluster <job> [--clusters K]``: spherical k-means of the pool in the job's gradient space, with
typical samples and labels per cluster (read by the report and the cluster_balanced policy)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from pruner.cli import COMMANDS
from pruner.explain.cluster import cluster_pool
from pruner.io.layout import JobLayout


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pruner cluster", description=COMMANDS["cluster"][1])
    ap.add_argument("job", help="job directory <output_dir>/<name>-<id> of a finished prune job")
    ap.add_argument("--clusters", type=int, default=100, help="number of clusters (default 100)")
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-size", type=int, default=262144, help="k-means training sample (at most)")
    ap.add_argument("--typical", type=int, default=5, help="typical samples listed per cluster")
    ap.add_argument("--label-key", default="classname", help="json metadata key of a class label ('' = none)")
    ap.add_argument("--no-shards", action="store_true", help="do not read the shards (no labels, no captions)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = cluster_pool(args.job, args.clusters, niter=args.niter, seed=args.seed, train_size=args.train_size,
                         typical=args.typical, label_key=args.label_key or None, read_shards=not args.no_shards)
    except (ValueError, FileNotFoundError) as e:
        print(f"pruner cluster: {e}", file=sys.stderr)
        return 2
    sizes, layout = [c["size"] for c in s["clusters"]], JobLayout(Path(args.job))
    print(json.dumps({"job": args.job, "n_samples": s["n_samples"], "n_clusters": s["n_clusters"],
                      "objective": s["objective"], "sizes": {"min": min(sizes), "max": max(sizes)},
                      "written": [str(layout.clusters_table), str(layout.clusters_summary)],
                      "seconds": round(s["seconds"], 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
