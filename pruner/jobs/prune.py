"""A prune job: score, then reduce (:func:`run`). Entrypoint:
``ray job submit --working-dir . -- python -m pruner.jobs.prune --config job.yaml``, the same command as
``pruner prune`` (:mod:`pruner.cli.prune`, which has the exit statuses).

Idempotent: re-running a finished job (every shard scored and summary.json written, which the reduce step does
last) starts no Ray instance and recomputes nothing; it prints the existing summary's counts. Re-running it with
other ``select`` settings (not part of the job id) scores nothing either: it only re-selects from the stored score
tables, and config.yaml and summary.json then hold the new settings.
"""
from __future__ import annotations

import contextlib
import sys

from pruner.config import JobConfig
from pruner.io.layout import JobLayout
from pruner.jobfiles import JobFiles
from pruner.jobs.jobdir import ResolvedJob, create_job_dir, resolve_job
from pruner.logs import log_file


def run(cfg: JobConfig, prior: JobLayout | None = None, job: ResolvedJob | None = None,
        local: bool = False) -> tuple[int, dict]:
    """Score, then reduce. Returns (exit status, summary-or-stats). ``prior``: a finished job this one extends by
    later checkpoints (pruner.jobs.resume); ``job``: the config's job directory when the caller has resolved it
    (:func:`pruner.jobs.jobdir.resolve_job`); ``local``: score in this process (pruner.distributed.local) instead of
    on Ray actors: the same files, the same bytes. The job directory's lock is held for the whole run (``prior``'s
    shared), so a second driver on it is refused (:class:`pruner.io.layout.JobLockedError`).

    The walk: resolve the job directory (pruner.jobs.jobdir), plan what to score with the resume and extension
    checks (pruner.jobs.resume), hand the plan to a runner (pruner.distributed.driver or .local), reduce the score
    tables into the ranking and keep set (pruner.select.reduce)."""
    job = job or resolve_job(cfg)
    create_job_dir(cfg, job)
    layout = job.layout
    print(f"pruner: job directory {layout.root}", flush=True)
    with layout.locked(), prior.locked(exclusive=False) if prior is not None else contextlib.nullcontext(), \
            log_file(layout.log_file):
        return _run_locked(cfg, job, prior, local)


def _run_locked(cfg: JobConfig, job: ResolvedJob, prior: JobLayout | None, local: bool) -> tuple[int, dict]:
    from pruner.io.atomic import write_json_atomic
    from pruner.jobs.resume import plan_scoring
    from pruner.select.reduce import finalize

    layout, pool = job.layout, job.pool
    plan = plan_scoring(cfg, layout, pool, job.target, prior)
    if not plan.pending:
        stats = plan.stats(layout)
    elif local:
        from pruner.distributed.local import score_pending
        stats = score_pending(cfg, layout, job.traj, plan)
    else:  # imports Ray only when there is something to score
        from pruner.distributed.driver import score_pending
        stats = score_pending(cfg, layout, job.traj, plan)
    summary = JobFiles(layout).summary()
    if (stats["shards_skipped"] == stats["shards_total"] and layout.ranking.exists()
            and summary.get("counts", {}).get("shards") == len(pool)):
        if summary.get("select") == cfg.select.model_dump(mode="json"):
            c = summary["counts"]
            print(f"pruner: job already complete, nothing recomputed: kept {c['kept']} of {c['samples']} samples; "
                  f"summary: {layout.summary}", flush=True)
            return 0, summary
        print("pruner: every shard is already scored; selecting again with this run's select settings", flush=True)
    if stats["shards_failed"]:
        write_json_atomic(layout.failed, stats)
        print(f"pruner: {len(stats['shards_failed'])} shard(s) failed: {sorted(stats['shards_failed'])}", flush=True)
        return 1, stats
    # finalize replaces config.yaml (its select settings), the ranking, keep/ and summary.json together, or none
    summary = finalize(cfg, layout, pool, stats)
    layout.failed.unlink(missing_ok=True)  # left by an earlier run whose failures are now fixed
    c = summary["counts"]
    n = stats["shards_changed"]
    changed = f"; {n} shard(s) scored again because they changed" if n else ""
    filtered = "".join(_stage_note(st) for st in summary.get("stages", []))
    print(f"pruner: kept {c['kept']} of {c['samples']} samples by {summary['score']}{filtered} "
          f"({c['rejected']} rejected by the reader{changed}); summary: {layout.summary}", flush=True)
    for w in summary.get("warnings", []):
        print(f"pruner: WARNING: {w}", file=sys.stderr, flush=True)
    return 0, summary


def _stage_note(st: dict) -> str:
    """One stage of summary.json in the prune command's last line (nothing for the final top-k / policy)."""
    if st["stage"] == "filter":
        return f"; the filter stage set apart the {st['set_apart']} lowest by {st['score']} first"
    if st["stage"] == "niche_test":
        found = (f"found one ({st['upper_tail']} samples stand out), so {st['ranked_by']} ranked"
                 if st["niche"] else f"found none, so {st['ranked_by']} ranked the pool")
        return (f"; the niche test of {st['score']} {found} (excess {st['excess']} samples, bound "
                f"{st['bound']:.0f} at level {st['alpha']:g})")
    return ""


if __name__ == "__main__":  # `python -m pruner.jobs.prune`: the `ray job submit` entrypoint of deploy/ and the docs
    from pruner.cli.prune import main
    sys.exit(main())
