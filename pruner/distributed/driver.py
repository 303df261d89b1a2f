"""The Ray runner: the shared stage (shared quantities once per checkpoint, the OGA forest) on SharedComputer
actors, then the pending shards on a :class:`~pruner.distributed.pool.RetryingActorPool` of ShardScorer actors;
every result is written atomically as it arrives (pruner.distributed.shard_tasks). What to score, and the resume
and extension checks, come decided in a :class:`~pruner.distributed.shard_tasks.ScoringPlan`
(pruner.jobs.resume); the local runner (pruner.distributed.local) takes the same plan and writes the same files.

Failed shards (after ``ray.max_retries`` retries, see pruner.distributed.pool) are reported in
``stats["shards_failed"]`` with one clean line each, their tracebacks in ``failure_tracebacks``;
``stats["failed_attempts"]`` counts every failed attempt per shard.

Metrics (Ray's Prometheus export, shown on the dashboard): ``pruner_samples_scored`` and ``pruner_shards_done``
from the actors, ``pruner_shard_attempts_failed`` and ``pruner_shards_failed`` (given up after the retries) from
the driver.
"""
from __future__ import annotations

import logging
import os
import re
import time

import numpy as np
import ray
from ray.util.metrics import Counter

from pruner.config import JobConfig
from pruner.distributed.actors import remote_classes
from pruner.distributed.pool import RetryingActorPool, placement_guard
from pruner.distributed.shard_tasks import (FINAL_ERRORS, ScoringPlan, job_forest, prior_components,
                                            save_oga_subsample, write_shard_result)
from pruner.io.atomic import write_json_atomic
from pruner.io.layout import JobLayout
from pruner.model.checkpoints import Trajectory
from pruner.scores.shared import load_state, save_state

log = logging.getLogger("pruner.driver")


def connect_ray(cfg: JobConfig) -> None:
    """Join the cluster named by ray.address or RAY_ADDRESS (set by `ray job submit`); else start a private
    local instance."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", include_dashboard=False if not address else None,
             log_to_driver=True, configure_logging=False)


def actor_plan(cfg: JobConfig) -> tuple[int, int]:
    """(number of scoring actors, GPUs in the cluster they are sized by or 0 for CPU actors) per ray.accelerator."""
    present = int(ray.cluster_resources().get("GPU", 0))
    acc = cfg.ray.accelerator
    if acc == "gpu":
        if present < cfg.ray.num_actors:
            log.info("requesting %d GPU actors, %d GPU(s) in the cluster now: waiting up to %.0fs for the "
                     "autoscaler to add GPU workers", cfg.ray.num_actors, present, cfg.ray.placement_timeout_s)
        return cfg.ray.num_actors, cfg.ray.num_actors
    if acc == "auto" and present:
        return present, present
    return cfg.ray.num_actors, 0


def shared_phase(cfg: JobConfig, layout: JobLayout, traj: Trajectory, plan: ScoringPlan, Shared, wait_placed,
                 n_workers: int) -> tuple[list, object]:
    """The shared quantities of checkpoints ``first``.. as Ray object refs, one per checkpoint, and the OGA forest
    (None without OGA). Missing states are computed by up to ``n_workers`` SharedComputer actors (checkpoints are
    independent: checkpoint i goes to actor i mod n; each actor picks the same bank, target, reference and curvature
    samples) and saved (``shared/ckpt-<i>.pt``) as they finish; saved ones are read. The OGA subsample's features
    are computed on a job's first run, its rows split between the actors at batch boundaries, and saved; the forest
    is fitted on them (fixed random_state: a re-run refits the identical forest). Whatever the number of actors,
    every state and feature row is computed from the same inputs in the same batches: the same bytes.

    Memory: the driver holds one checkpoint's state at a time (fetched, saved, then dropped), never every
    checkpoint's parameter-sized vectors at once; the actors fetch the refs."""
    m, first = len(traj.checkpoints), plan.first
    refs: dict[int, object] = {}
    todo = [i for i in range(first, m) if not layout.shared(i).exists()]
    need_oga = "oga" in cfg.scores.methods and not layout.oga_subsample.exists()
    comps = []
    try:  # the actors are killed however this ends: a pending resource request would otherwise stay queued
        if todo or need_oga:
            cfg_dict = cfg.model_dump(mode="json")
            comps = [Shared.remote(cfg_dict, traj, plan.pool, plan.target, cfg.ray.cpus_per_actor, first)
                     for _ in range(max(1, min(n_workers, len(todo) or n_workers)))]
            wait_placed([c.ping.remote() for c in comps], "the shared-quantity actors")
            if not layout.shared_inputs.exists():  # the record of what the shared quantities are computed from
                write_json_atomic(layout.shared_inputs, plan.picked or ray.get(comps[0].input_digests.remote()))
        t0 = time.time()  # each ref is an actor's return value, owned by this driver: it outlives the actor
        running = {comps[j % len(comps)].compute.remote(i): i for j, i in enumerate(todo)}
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            i = running.pop(ref)
            save_state(ray.get(ref), layout.shared(i))
            refs[i] = ref
            log.info("shared quantities of checkpoint %d (%d of %d) after %.1fs", i, len(todo) - len(running),
                     len(todo), time.time() - t0)
        for i in range(first, m):  # the saved ones, read
            if i not in refs:
                refs[i] = ray.put(load_state(layout.shared(i)))
        if need_oga:  # saved, so a re-run refits the identical forest without rescoring the subsample
            n = ray.get(comps[0].oga_subsample_size.remote())
            b = cfg.features.batch_size
            cuts = [min(n, b * -(-n * j // (len(comps) * b))) for j in range(len(comps) + 1)]
            state_refs = [refs[i] for i in range(first, m)]
            parts = ray.get([c.oga_features.remote(state_refs, lo, hi)
                             for c, lo, hi in zip(comps, cuts, cuts[1:]) if hi > lo])
            save_oga_subsample(layout, np.concatenate(parts))
    finally:
        for c in comps:
            ray.kill(c)
    return [refs[i] for i in range(first, m)], job_forest(cfg, layout)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CARETS = re.compile(r"^[ \t~^]*\^[ \t~^]*$", re.M)  # the lines of ^ and ~ that point at a traceback's expression


def clean_traceback(text: str) -> str:
    """A Ray task's error text without terminal colour codes and without the marker lines of ^ and ~ under traceback
    lines: fit for a JSON file that people read (``failed.json``)."""
    return re.sub(r"\n{3,}", "\n\n", _CARETS.sub("", _ANSI.sub("", text)))


def failure_message(error: Exception) -> str:
    """One clean line for a failed shard attempt: the task's own exception as ``<type>: <message>`` when Ray carries
    it (a RayTaskError's ``cause``), else the first line of the Ray error (an actor that died, a lost node)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return clean_traceback(f"{type(cause).__name__}: {cause}").strip()
    lines = [ln for ln in clean_traceback(str(error)).splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[0].strip() if lines else ''}"


def _metrics() -> dict:
    return {"attempts_failed": Counter("pruner_shard_attempts_failed",
                                       description="shard scoring attempts that failed (retried or not)"),
            "shards_failed": Counter("pruner_shards_failed",
                                     description="shards given up after ray.max_retries retries")}


def score_pending(cfg: JobConfig, layout: JobLayout, traj: Trajectory, plan: ScoringPlan) -> dict:
    """Score ``plan.pending`` on Ray actors and write each result; returns the run statistics (failed shards
    included). With ``plan.first`` > 0 (extending a job) only the later checkpoints are loaded and computed, and each
    shard's scores combine its stored components with the new ones, as a full run would."""
    stats = plan.stats(layout)
    connect_ray(cfg)
    n_actors, gpus = actor_plan(cfg)
    cpus = cfg.ray.cpus_per_actor
    Shared, Scorer = remote_classes(num_gpus=1 if gpus else 0, num_cpus=cpus, max_restarts=8)
    stats.update(actors=n_actors, gpus=gpus)
    wait_placed = placement_guard(cfg.ray.placement_timeout_s, f"{cpus:g} CPU" + (" + 1 GPU" if gpus else ""))
    metrics = _metrics()

    t0 = time.time()
    state_refs, forest = shared_phase(cfg, layout, traj, plan, Shared, wait_placed, n_actors)
    stats["shared_seconds"] = time.time() - t0

    shared = [state_refs, ray.put(forest)]  # sent with each task, nested: Ray passes the refs unresolved
    cfg_dict = cfg.model_dump(mode="json")
    pool = RetryingActorPool([Scorer.remote(cfg_dict, traj, cpus, plan.first) for _ in range(n_actors)],
                             max_retries=cfg.ray.max_retries, wait_placed=wait_placed, final=FINAL_ERRORS)

    def submit(actor, url):
        return actor.score_shard.remote(url, shared, prior_components(plan.prior, url, plan.first))

    def on_result(url, result) -> int:
        _, table, feats, hzg, rejects, st = result
        write_shard_result(layout, plan, url, table, feats, hzg, rejects)
        return st["n"]

    def on_failure(url, error: Exception, attempt: int | None, given_up: bool) -> None:
        ray_error = isinstance(error, ray.exceptions.RayError)
        err = failure_message(error) if ray_error else str(error) if attempt is None else \
            f"{type(error).__name__}: {error}"
        if attempt is not None:
            stats["failed_attempts"][url] = attempt
            metrics["attempts_failed"].inc()
        if not given_up:
            log.warning("shard %s failed (attempt %d), retrying: %s", url, attempt, err[:300])
            return
        log.error("shard %s failed %s, giving up: %s", url, f"{attempt} time(s)" if attempt else "unattempted",
                  err[:300])
        stats["shards_failed"][url] = err[:2000]
        if ray_error:
            stats.setdefault("failure_tracebacks", {})[url] = clean_traceback(str(error))[-20000:]
        metrics["shards_failed"].inc()

    timing = pool.run(plan.pending, submit, on_result, on_failure)
    stats["score_seconds"] = timing.pop("run_seconds")  # the scoring phase: actor start-up excluded
    stats["samples_scored_this_run"] = timing.pop("units_done")
    stats.update(timing)
    return stats
