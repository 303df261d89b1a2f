"""``pruner explain <job> --image F --caption C | --uid U | --target SHARDS | --job-target``: TracIn proponents
and opponents of a pair, a pool sample or a target set, from the job's stored features (a faiss index)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from pruner.cli import COMMANDS
from pruner.explain.index import KINDS
from pruner.explain.query import explain


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pruner explain", description=COMMANDS["explain"][1])
    ap.add_argument("job", help="job directory <output_dir>/<name>-<id> of a finished prune job")
    ap.add_argument("--image", help="query image file (with --caption)")
    ap.add_argument("--caption", help="query caption (with --image)")
    ap.add_argument("--uid", help="explain a pool sample by uid (its stored vector)")
    ap.add_argument("--target", action="append", default=[], metavar="SHARDS",
                    help="a target WebDataset (dir, glob, brace pattern; repeatable): its mean projected gradient")
    ap.add_argument("--job-target", action="store_true", help="the job's own target set (projected v_target)")
    ap.add_argument("-k", type=int, default=10, help="proponents and opponents to list (default 10)")
    ap.add_argument("--index", default="auto", choices=("auto",) + KINDS,
                    help="auto: flat for small pools (<1M, <=4 GiB fp32), ivf_flat below 10M (<=16 GiB), else ivf_pq")
    ap.add_argument("--nlist", type=int, default=None)
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--rerank", type=int, default=None,
                    help="re-score rerank*k candidates exactly (default 16 for ivf_pq, 2 otherwise)")
    ap.add_argument("--max-target-samples", type=int, default=None)
    ap.add_argument("--no-captions", action="store_true", help="do not read captions from the shards")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--rebuild-index", action="store_true")
    ap.add_argument("--out", help="write the result here (JSON) and beside it as CSV; default: print JSON")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = explain(args.job, image=args.image, caption=args.caption, uid=args.uid, target=args.target or None,
                         job_target=args.job_target, k=args.k, kind=args.index, nprobe=args.nprobe,
                         nlist=args.nlist, rerank=args.rerank, max_target_samples=args.max_target_samples,
                         captions=not args.no_captions, device=args.device, rebuild_index=args.rebuild_index,
                         out=args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"pruner explain: {e}", file=sys.stderr)
        return 2
    if args.out:
        print(f"pruner explain: wrote {args.out} and {Path(args.out).with_suffix('.csv')}")
    else:
        print(json.dumps(result, indent=2, default=str))
    print(f"pruner explain: saved {result['saved']} (`pruner report {args.job}` shows it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
