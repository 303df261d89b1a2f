"""The local runner: a job's shared stage and its pending shards in this process, with one
:class:`pruner.scorer.Scorer`, no Ray. It takes the same :class:`~pruner.distributed.shard_tasks.ScoringPlan` as the
Ray runner (pruner.distributed.driver) and writes the same files, which hold the same bytes when both run on the
same kind of device (``model.device`` here, the actors' own there): the shared states and the OGA subsample are
computed from the same samples in the same batches, and a shard's scores depend only on it and them. For a laptop,
a notebook, a debugger, the tests and the benchmarks (``pruner prune --local``); a cluster uses the Ray runner.

Failures: a shard whose task raises is retried up to ``ray.max_retries`` times (an unreadable shard may be a
passing I/O error), except the deterministic ones (:data:`~pruner.distributed.shard_tasks.FINAL_ERRORS`), and
then reported in ``stats["shards_failed"]``, as the Ray runner does.
"""
from __future__ import annotations

import logging
import time
import traceback
from functools import cached_property

from tqdm import tqdm

from pruner.config import JobConfig
from pruner.distributed.shard_tasks import (FINAL_ERRORS, ScoringPlan, fit_forest, job_forest, prior_components,
                                            save_oga_subsample, score_shard, write_shard_result)
from pruner.io.atomic import write_json_atomic
from pruner.io.layout import JobLayout
from pruner.model.checkpoints import Trajectory
from pruner.scorer import Scorer, input_digests, pick_shared_inputs, uses_propagation
from pruner.scores.shared import CheckpointShared, load_state, save_state

log = logging.getLogger("pruner.driver")


class LocalScoring:
    """The job's scorer in this process: :meth:`shared_stage` computes (and, given a job directory, saves or reads)
    the shared quantities of checkpoints ``first``.. and the OGA forest, then :attr:`scorer` scores samples."""

    def __init__(self, cfg: JobConfig, traj: Trajectory, pool: list[str], target: list[str], first: int = 0,
                 device: str = "auto"):
        self.cfg, self.traj, self.pool, self.target, self.first = cfg, traj, pool, target, first
        self.scorer = Scorer(cfg, traj, device=device, first=first)

    @cached_property
    def inputs(self):
        """The samples behind the shared quantities (pruner.scorer.pick_shared_inputs), read once when needed."""
        return pick_shared_inputs(self.cfg, self.pool, self.target, curvature=uses_propagation(self.cfg),
                                  oga="oga" in self.cfg.scores.methods)

    def _state(self, i: int, layout: JobLayout | None) -> dict:
        if layout is not None and layout.shared(i).exists():
            return load_state(layout.shared(i))
        bank, target, reference, curvature, _ = self.inputs
        state = self.scorer.compute_shared(i, bank, target, reference, curvature or ()).to_state()
        if layout is not None:
            save_state(state, layout.shared(i))
        return state

    def shared_stage(self, layout: JobLayout | None = None, picked: dict[str, str] | None = None) -> list:
        """Set the scorer's shared quantities and forest; returns the shared quantities (one per loaded
        checkpoint). With ``layout``, saved states and the saved OGA subsample are read and missing ones computed and
        saved, with the record of their inputs (``picked``, else computed here) when something is computed, as the
        Ray runner does."""
        m, oga = len(self.traj.checkpoints), "oga" in self.cfg.scores.methods
        if layout is not None and not layout.shared_inputs.exists() and (
                any(not layout.shared(i).exists() for i in range(self.first, m)) or
                (oga and not layout.oga_subsample.exists())):
            write_json_atomic(layout.shared_inputs, picked or input_digests(self.inputs))
        shared = [CheckpointShared.from_state(self._state(i, layout)) for i in range(self.first, m)]
        self.scorer.set_shared(shared)
        if oga and layout is None:
            self.scorer.forest = fit_forest(self.cfg, self.scorer.last_checkpoint_features(self.inputs.oga))
        elif oga:
            if not layout.oga_subsample.exists():
                save_oga_subsample(layout, self.scorer.last_checkpoint_features(self.inputs.oga))
            self.scorer.forest = job_forest(self.cfg, layout)
        return shared


def score_pending(cfg: JobConfig, layout: JobLayout, traj: Trajectory, plan: ScoringPlan) -> dict:
    """Score ``plan.pending`` in this process (on ``model.device``) and write each result; returns the run
    statistics: the Ray runner's keys (``actors`` 0) but its actor start-up ones."""
    stats = plan.stats(layout)
    t0 = time.time()
    local = LocalScoring(cfg, traj, plan.pool, plan.target, plan.first, cfg.model.device)
    local.shared_stage(layout, plan.picked)
    stats["shared_seconds"] = time.time() - t0
    t1, done = time.time(), 0
    bar = tqdm(total=len(plan.pending), desc="shards", unit="shard", dynamic_ncols=True)
    for url in plan.pending:
        for attempt in range(1, cfg.ray.max_retries + 2):
            error, trace = None, None
            try:  # the task: whatever raises in it fails a Ray task, so here too (with its traceback)
                _, table, feats, hzg, rejects, st = score_shard(local.scorer, cfg, url,
                                                                prior_components(plan.prior, url, plan.first))
            except Exception as e:  # noqa: BLE001
                error, trace = e, traceback.format_exc()
            else:
                try:  # writing: a ValueError (e.g. features that overflow float16) is a failed attempt, as on Ray
                    write_shard_result(layout, plan, url, table, feats, hzg, rejects)
                except ValueError as e:
                    error = e
            if error is None:
                done += st["n"]
                break
            stats["failed_attempts"][url] = attempt
            err = f"{type(error).__name__}: {error}"
            if isinstance(error, FINAL_ERRORS) or attempt > cfg.ray.max_retries:
                log.error("shard %s failed %d time(s), giving up: %s", url, attempt, err[:300])
                stats["shards_failed"][url] = err[:2000]
                if trace:
                    stats.setdefault("failure_tracebacks", {})[url] = trace[-20000:]
                break
            log.warning("shard %s failed (attempt %d), retrying: %s", url, attempt, err[:300])
        bar.update(1)
        bar.set_postfix(samples=done, rate=f"{done / max(time.time() - t1, 1e-9):.1f}/s")
    bar.close()
    stats.update(score_seconds=time.time() - t1, samples_scored_this_run=done)
    return stats
