"""``pruner prune --config job.yaml [--set key=value ...]`` (also ``python -m pruner.jobs.prune``, the entrypoint
of ``ray job submit``): score, rank and select a pool.

Exit status: 0 on success; 1 if any shard failed after its retries (the summary lists them; nothing is selected
from a partial pool), the job directory cannot be resumed as asked, or another driver is running on it (the
message names the cause and the fix); 2 for an invalid config or a bad checkpoint. The config, the lock and every
checkpoint are checked before any model, Ray or directory work, so refusals come at once.
"""
from __future__ import annotations

import argparse
import sys

from pruner.cli import COMMANDS
from pruner.config import ConfigError, check_checkpoint_weights, load_config
from pruner.io.layout import JobLockedError, JobRefusedError
from pruner.jobs.jobdir import resolve_job
from pruner.jobs.prune import run
from pruner.logs import setup_console


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pruner prune", description=COMMANDS["prune"][1])
    ap.add_argument("--config", required=True, help="job YAML")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set select.keep_fraction=0.3 (repeatable)")
    ap.add_argument("--local", action="store_true",
                    help="score in this process, without Ray (the same outputs; for one machine, notebooks, debugging)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console()
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    try:  # before any model, Ray or directory work: a second driver is refused at once
        job = resolve_job(cfg)
        job.layout.check_unlocked()
        check_checkpoint_weights(cfg)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except (JobLockedError, JobRefusedError) as e:
        print(f"pruner: {e}", file=sys.stderr)
        return 1
    refusals: tuple = (JobLockedError, JobRefusedError)
    if not args.local:  # imports Ray: only once the job will run on it
        from pruner.distributed.pool import PlacementError
        refusals += (PlacementError,)
    try:
        status, _ = run(cfg, job=job, local=args.local)
    except refusals as e:
        print(f"pruner: {e}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
