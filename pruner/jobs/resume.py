"""Resume and extension checks: what a run of a job must score, decided before any model loads or Ray starts
(:func:`plan_scoring`, a :class:`pruner.distributed.shard_tasks.ScoringPlan` that either runner executes).

Resume and idempotency: the job directory is keyed by a job id derived from the config fingerprint (with the
pool's shard specs), the target shards and the checkpoint contents (pruner.jobs.jobdir). A shard is done when its
score Parquet exists (written last, atomically) and records the identity the shard file still has (size and
modification time, or the object store's ETag: a shard repaired since is scored again), so a re-run after a crash
at any point skips finished shards, rescores unfinished ones from scratch, and never writes a sample twice. Shared
quantities are saved too and reloaded instead of recomputed; every run first checks that the samples they were
computed from are still the ones the pool and target set give (:func:`check_shared_inputs`).

Extension (``pruner rescore --add-checkpoint``): a finished job of the same config whose trajectory is a prefix of
this one's (:func:`reused_checkpoints`) lends its components, shared states and features for the earlier
checkpoints, so only the later ones are computed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from pruner.config import JobConfig
from pruner.distributed.shard_tasks import ScoringPlan
from pruner.io.atomic import link_or_copy
from pruner.io.layout import JobLayout, JobRefusedError, shard_identities
from pruner.jobfiles import JobFiles
from pruner.scorer import input_digests, pick_shared_inputs, uses_propagation

log = logging.getLogger("pruner.driver")


def reused_checkpoints(prior: JobLayout | None, cfg: JobConfig, layout: JobLayout) -> int:
    """How many leading checkpoints of the job ``layout`` (config ``cfg``) the finished job ``prior`` scored (0
    without one): their components, shared quantities and features are reused, since a checkpoint's components
    never depend on the others. ``prior`` must have the same config but for the trajectory, and its checkpoints
    (path, step, learning rates, file contents) must be the first ones of ``layout``'s, fewer than all of them.
    Jobs from before the contents were recorded (no ``sha256`` in their trajectory.json) are matched without them.
    The samples the shared quantities are computed from are checked by :func:`check_shared_inputs`."""
    if prior is None:
        return 0
    prior_files = JobFiles(prior)
    prior_cfg = prior_files.config
    if cfg.model_copy(update={"trajectory": prior_cfg.trajectory}).fingerprint() != prior_cfg.fingerprint():
        raise ValueError(f"{prior.root} was scored with another config than this job's (beyond the trajectory): its "
                         f"components would not combine with the new ones (fix: run a full job)")
    done, mine = prior_files.checkpoint_records, JobFiles(layout).checkpoint_records
    keys = ("path", "step", "lr", "lr_mean") + (("sha256",) if all("sha256" in d for d in done + mine) else ())
    if len(done) >= len(mine):
        raise ValueError(f"{prior.root} already scored {len(done)} checkpoints; this trajectory has {len(mine)} "
                         f"(fix: extend a job by at least one later checkpoint)")
    for i, (d, c) in enumerate(zip(done, mine)):
        if any(d[k] != c[k] for k in keys):
            raise ValueError(f"checkpoint {i} of {prior.root} ({d['path']}, step {d['step']}) is not checkpoint {i} "
                             f"of this trajectory ({c['path']}, step {c['step']}), or its file changed since that job "
                             f"ran (fix: extend a job only by later checkpoints; after changing a checkpoint file, "
                             f"run a full job)")
    return len(done)


def shared_input_digests(cfg: JobConfig, pool: list[str], target: list[str]) -> dict[str, str]:
    """:func:`pruner.scorer.input_digests` of the hash-picked samples behind a job's shared quantities. Reads those
    samples (the first ones of the pool in sorted shard order, and of the target set); loads no model."""
    return input_digests(pick_shared_inputs(cfg, pool, target, curvature=uses_propagation(cfg),
                                            oga="oga" in cfg.scores.methods))


def _changed_inputs(record: Path, picked: dict[str, str]) -> list[str]:
    """The names of the digests in ``record`` (a ``shared/inputs.json``) that differ from ``picked``; a record
    written before a digest was recorded (``oga``) is compared on the ones it has, a missing record not at all."""
    if not record.exists():
        return []
    before = json.loads(record.read_text())
    return sorted(k for k in before.keys() & picked.keys() if before[k] != picked[k])


def check_shared_inputs(cfg: JobConfig, layout: JobLayout, pool: list[str], target: list[str],
                        prior: JobLayout | None, pending: list[str]) -> dict[str, str] | None:
    """The digests of the samples the shared quantities come from (:func:`shared_input_digests`), checked on every
    run against the job's record ``shared/inputs.json`` and, when extending ``prior``, against that job's record.
    None, and nothing read, when neither record exists (a job's first run: the shared stage, which reads those
    samples anyway, supplies the record).

    A difference means the pool's first shards in sorted order (where the bank, reference and OGA samples are
    picked) or the target samples are not the ones the job's shared quantities, scores and forest were computed
    from: a shard that sorts first was added, or one of the first shards or a target shard changed. Resuming would
    give other scores than a full run, so the job is refused (:class:`JobRefusedError`), naming the new or changed
    shards (``pending``) that sort before scored ones, and the fix."""
    if not layout.shared_inputs.exists() and (prior is None or not prior.shared_inputs.exists()):
        return None
    picked = shared_input_digests(cfg, pool, target)
    changed = _changed_inputs(layout.shared_inputs, picked)
    if changed:
        waiting = set(pending)
        scored = [u for u in pool if u not in waiting]
        early = [u for u in pending if scored and u < scored[-1]]
        cause = (f"new or changed shard(s) sort before ones the job scored: {', '.join(early[:3])}"
                 f"{' ...' if len(early) > 3 else ''}" if early else
                 "one of the first shards of the pool in sorted order, or a target shard, changed")
        raise JobRefusedError(
            f"the {', '.join(changed)} samples picked now differ from those the shared quantities of {layout.root} "
            f"were computed from ({layout.shared_inputs}): {cause}. Its scores would not be those of a full run "
            f"(fix: run a full job: set output_dir to a new folder, or move {layout.root} away; to grow a lake "
            f"incrementally, give new shards names that sort after the existing ones)")
    changed = _changed_inputs(prior.shared_inputs, picked) if prior is not None else []
    if changed:
        raise ValueError(f"the {', '.join(changed)} samples picked now differ from those {prior.root} used (the lake "
                         f"or the target set changed since it ran), so its scores cannot be extended (fix: run a full "
                         f"job with the longer trajectory)")
    return picked


def _check_extension(cfg: JobConfig, prior: JobLayout, pending: list[str], identities: dict[str, str | None],
                     first: int) -> None:
    """The job being extended must have scored every pending shard from its current file, with the features this
    job links from it."""
    unscored, changed_since = prior.stale_shards(pending, identities)
    if unscored:
        raise ValueError(f"{len(unscored)} shard(s), e.g. {unscored[0]}, were not scored by the job being extended, "
                         f"{prior.root} (fix: finish or re-run that job first, so it scores them, then extend it)")
    if changed_since:  # its stored components come from the old file: combining them with new ones would mix both
        raise ValueError(f"{len(changed_since)} shard(s), e.g. {changed_since[0]}, changed since the job being "
                         f"extended, {prior.root}, scored them (fix: re-run that job first, so it re-scores them, "
                         f"then extend it)")
    f = cfg.features
    lost = [p for u in pending for i in range(first)
            for p, saved in ((prior.features(u, i), f.save), (prior.hzg(u, i), f.save_hzg)) if saved and not p.exists()]
    if lost:
        raise ValueError(f"{len(lost)} stored feature file(s) of the job being extended are missing, e.g. {lost[0]} "
                         f"(fix: restore them, or run a full job with the longer trajectory)")


def plan_scoring(cfg: JobConfig, layout: JobLayout, pool: list[str], target: list[str],
                 prior: JobLayout | None = None) -> ScoringPlan:
    """The pending shards (those without a score file, and those whose file changed since they were scored: another
    size, modification time or ETag, whose outputs are replaced) and the checks that resuming or extending gives a
    full run's scores. Raises :class:`JobRefusedError` or ValueError (with the fix) when it would not. When extending
    ``prior``, links its shared states into this job (a checkpoint's weights depend only on it and its predecessor,
    so the reused states' eta and a_t are this job's)."""
    identities = shard_identities(pool)  # before any shard is read: a shard re-written meanwhile is scored again
    missing, changed = layout.stale_shards(pool, identities)
    if changed:
        log.warning("%d shard(s) changed since they were scored (size, modification time or ETag differ), scoring "
                    "them again: %s", len(changed), ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
    stale = set(missing) | set(changed)
    pending = [u for u in pool if u in stale]
    first = reused_checkpoints(prior, cfg, layout)
    picked = check_shared_inputs(cfg, layout, pool, target, prior, pending)
    plan = ScoringPlan(pool, target, pending, identities, changed, first, picked, prior)
    if not pending:
        log.info("all %d shards already scored in %s", len(pool), layout.root)
        return plan
    if prior is not None:
        _check_extension(cfg, prior, pending, identities, first)
        for i in range(first):
            if not layout.shared(i).exists():
                link_or_copy(prior.shared(i), layout.shared(i))
    return plan
