"""``pruner report <job> [--out F]``: a self-contained HTML report of a finished job (scores, method agreement,
top and bottom pairs, saved explain results, gradient clusters, rejects, keep/drop)."""
from __future__ import annotations

import argparse
import sys

from pruner.cli import COMMANDS
from pruner.report.html import build_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pruner report", description=COMMANDS["report"][1])
    ap.add_argument("job_dir", help="the job directory (<output_dir>/<name>-<job id>)")
    ap.add_argument("--out", help="output file (default: <job dir>/report.html)")
    ap.add_argument("--top", type=int, default=12, help="pairs shown as most helpful and as most harmful, and "
                    "proponents and opponents shown per explained query")
    args = ap.parse_args(argv)
    try:
        out = build_report(args.job_dir, args.out, top=args.top)
    except FileNotFoundError as e:
        print(f"pruner report: {e}", file=sys.stderr)
        return 2
    print(f"pruner report: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
