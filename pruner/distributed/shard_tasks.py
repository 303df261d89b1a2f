"""What every runner does, with or without Ray: the plan of a run, one shard's scoring, its result written, the
shared states and the OGA forest saved and read. The Ray runner (:mod:`pruner.distributed.driver`) and the local
one (:mod:`pruner.distributed.local`) differ only in where these run; imports no Ray.

A shard that cannot be opened at all (the reader's ``unreadable_shard``) fails its task instead of scoring as an
empty shard, so it is reported rather than silently selecting from a partial pool: :class:`ShardUnreadableError`
when the cause may pass (missing on this node, permission or network error; retried, possibly on another node),
:class:`ShardNotATarError` when its bytes are not a tar archive (empty or garbage file; reported at once, as no
retry can help). Bad samples inside a readable shard stay rejects.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pruner.config import JobConfig
from pruner.io.atomic import atomic_path, link_or_copy
from pruner.io.layout import IDENTITY_KEY, JobLayout
from pruner.io.shards import RejectLog, iter_shard, not_a_tar
from pruner.io.store import save_features
from pruner.scorer import Scorer, ShardChangedError
from pruner.scores.combine import component_columns
from pruner.scores.oga import fit_isolation_forest


@dataclass
class ScoringPlan:
    """What a run scores, decided before any model loads (pruner.jobs.resume.plan_scoring): the pool and target
    shard lists; ``pending``, the shards to score (unscored, or changed since: ``changed``), in pool order;
    ``identities``, each pool shard's identity read before any shard is (a shard re-written meanwhile is scored
    again by the next run); ``first``, the checkpoints reused from ``prior`` (a finished job this one extends);
    ``picked``, the digests of the shared quantities' samples when a record exists (else None: the shared stage
    records them)."""

    pool: list[str]
    target: list[str]
    pending: list[str]
    identities: dict[str, str | None]
    changed: list[str] = field(default_factory=list)
    first: int = 0
    picked: dict[str, str] | None = None
    prior: JobLayout | None = None

    def stats(self, layout: JobLayout) -> dict:
        """The run statistics before anything is scored (the runners add their counts and timings)."""
        return {"shards_total": len(self.pool), "shards_skipped": len(self.pool) - len(self.pending),
                "shards_changed": len(self.changed), "shards_failed": {}, "failed_attempts": {}, "actors": 0,
                "gpus": 0, "checkpoints_reused": self.first, "job": layout.root.name,
                **({"extends": str(self.prior.root)} if self.prior else {})}


class ShardUnreadableError(OSError):
    """The shard could not be opened as a tar archive on this worker (see the module docstring)."""


class ShardNotATarError(ShardUnreadableError):
    """The shard's bytes are not a tar archive at all (empty or garbage file): never retried."""


#: failures that are the same on every retry and every node: reported at once, never retried
FINAL_ERRORS = (ShardChangedError, ShardNotATarError)


def score_shard(scorer: Scorer, cfg: JobConfig, url: str, prior=None):
    """Read and score one shard: (url, score table, [P g per scored checkpoint] (when features.save), [P H_z G per
    scored checkpoint], rejects table, stats). ``prior``: the shard's stored components in the job being extended
    (:func:`prior_components`)."""
    t0 = time.time()
    rejects = RejectLog()
    samples = list(iter_shard(url, rejects, allow_pipe=cfg.data.allow_pipe, max_samples=cfg.data.max_samples_per_shard))
    unreadable = [r["detail"] for r in rejects.records if r["reason"] == "unreadable_shard"]
    if unreadable:
        raise (ShardNotATarError if not_a_tar(rejects.open_error) else ShardUnreadableError)(unreadable[0])
    table, feats, hzg = scorer.score_table(samples, url, prior)
    return url, table, feats if cfg.features.save else [], hzg, rejects.to_table(), {
        "n": len(samples), "seconds": time.time() - t0, "rejects": rejects.counts()}


def prior_components(prior: JobLayout | None, url: str, first: int):
    """The uids and stored components of checkpoints 0..first-1 of a shard of the job being extended (None without
    one). Read by the driver and shipped to the worker, so workers need no shared filesystem for outputs."""
    if prior is None:
        return None
    path = prior.scores(url)
    return pq.read_table(path, columns=["uid", *component_columns(pq.read_schema(path).names, first)])


def write_shard_result(layout: JobLayout, plan: ScoringPlan, url: str, table, feats, hzg, rejects) -> None:
    """Features and rejects first, the score table last: its existence marks the shard as done, and its metadata
    records the shard file's identity when it was scored. Each file replaces the one of an earlier scoring of the
    shard atomically. ``feats`` and ``hzg`` are of checkpoints ``plan.first``..; those of the earlier ones are
    linked from the extended job."""
    first, prior, identity = plan.first, plan.prior, plan.identities[url]
    for i in range(first):
        for src, dst in ((prior.features(url, i), layout.features(url, i)), (prior.hzg(url, i), layout.hzg(url, i))):
            if src.exists():
                link_or_copy(src, dst)
    for i, f in enumerate(feats):
        save_features(layout.features(url, first + i), f)
    for i, f in enumerate(hzg):
        save_features(layout.hzg(url, first + i), f)
    with atomic_path(layout.rejects(url)) as tmp:
        pq.write_table(rejects, tmp)
    if identity is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), IDENTITY_KEY: identity.encode()})
    with atomic_path(layout.scores(url)) as tmp:
        pq.write_table(table, tmp)


def save_oga_subsample(layout: JobLayout, features: np.ndarray) -> None:
    """The OGA subsample's projected gradients [n, k] at the last checkpoint, saved so a re-run refits the
    identical forest without scoring the subsample again."""
    with atomic_path(layout.oga_subsample) as tmp, open(tmp, "wb") as fh:
        np.save(fh, features.astype(np.float32, copy=False))


def fit_forest(cfg: JobConfig, features: np.ndarray):
    """The OGA Isolation Forest on the subsample's features [n, k] (fixed random_state: every run and runner fits
    the identical forest)."""
    return fit_isolation_forest(features, seed=cfg.seed, trees=cfg.scores.oga.iforest_trees)


def job_forest(cfg: JobConfig, layout: JobLayout):
    """The forest of the job's saved OGA subsample (:func:`fit_forest`), or None without OGA."""
    return fit_forest(cfg, np.load(layout.oga_subsample)) if "oga" in cfg.scores.methods else None
