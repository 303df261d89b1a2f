"""The Ray driver: lists shards, computes shared quantities once per checkpoint, runs a pool of shard scorers
with retries and resume, writes every result atomically, then hands over to the reduce step.

Resume and idempotency: the job directory is keyed by a job id derived from the config fingerprint (with the
pool's shard specs), the target shards and the checkpoint contents. A shard is done when its score Parquet exists
(written last, atomically) and records the identity the shard file still has (size and modification time, or the
object store's ETag: a shard repaired since is scored again), so a re-run after a crash at any point skips
finished shards, rescores unfinished ones from scratch, and never writes a sample twice. Shared quantities are
saved too and reloaded instead of recomputed; every run first checks that the samples they were computed from are
still the ones the pool and target set give (:func:`check_shared_inputs`). When every shard is already scored, no
Ray instance is started at all.

Failures: a shard attempt fails when its task raises (including an unreadable shard, see
:class:`~pruner.distributed.actors.ShardScorer`) or its actor dies mid-shard (crash, OOM kill, node loss). The
shard is requeued up to ``ray.max_retries`` times, then reported in ``stats["shards_failed"]`` (the job exits
with status 1); ``stats["failed_attempts"]`` counts every failed attempt per shard. A dead actor is restarted by
Ray (``max_restarts``) and gets new work only once it answers a ping, so shards never queue behind an actor that
cannot come back (e.g. its node is gone and no other node has room); an actor that is dead for good is dropped,
and if none is left the remaining shards are reported as failed instead of waiting forever.

Timing: shards are handed out once every scoring actor has loaded its models (or ``ACTOR_START_GRACE_S`` after
the first one did), so ``stats["score_seconds"]`` is the scoring phase alone and ``actor_start_seconds`` the
start-up before it.

Metrics (Ray's Prometheus export, shown on the dashboard): ``pruner_samples_scored`` and ``pruner_shards_done``
from the actors, ``pruner_shard_attempts_failed`` and ``pruner_shards_failed`` (given up after the retries) from
the driver.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.util.metrics import Counter
from tqdm import tqdm

from pruner.config import JobConfig, load_job_config
from pruner.distributed.actors import ShardNotATarError, remote_classes
from pruner.io.atomic import atomic_path, link_or_copy, write_json_atomic
from pruner.io.layout import IDENTITY_KEY, JobLayout, JobRefusedError, shard_identities
from pruner.io.store import save_features
from pruner.model.checkpoints import Trajectory
from pruner.scores.combine import component_columns
from pruner.scores.oga import fit_isolation_forest
from pruner.scores.shared import load_state, save_state
from pruner.scorer import ShardChangedError, input_digests, pick_shared_inputs, uses_propagation

log = logging.getLogger("pruner.driver")
ACTOR_START_GRACE_S = 60.0  # after the first scoring actor is ready, wait at most this long for the others


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


class PlacementError(RuntimeError):
    """No node offered the resources an actor asks for within ray.placement_timeout_s."""


def placement_guard(cfg: JobConfig, gpus_per_actor: int):
    """``wait(ping refs, what)``: block until the first of the pings answers, or raise a PlacementError naming the
    resources no node offered after ray.placement_timeout_s (a pending actor would otherwise wait forever)."""
    def wait(refs: list, what: str) -> None:
        ready, _ = ray.wait(refs, num_returns=1, timeout=cfg.ray.placement_timeout_s)
        if not ready:
            need = f"{cfg.ray.cpus_per_actor:g} CPU" + (f" + {gpus_per_actor} GPU" if gpus_per_actor else "")
            raise PlacementError(
                f"{what} could not be placed within ray.placement_timeout_s={cfg.ray.placement_timeout_s:g}s: no "
                f"node offers {need} (cluster: {ray.cluster_resources()}). Fix: add such nodes (or let the "
                f"autoscaler do so), lower ray.cpus_per_actor, or set ray.accelerator (auto/cpu) to match the cluster")
    return wait


def _write_shard_result(layout: JobLayout, url: str, table, feats, hzg, rejects, identity: str | None,
                        prior: JobLayout | None = None, first: int = 0) -> None:
    """Features and rejects first, the score table last: its existence marks the shard as done, and its metadata
    records ``identity``, the shard file's when it was scored. Each file replaces the one of an earlier scoring of
    the shard atomically. ``feats`` and ``hzg`` are of checkpoints ``first``..; those of the earlier ones are linked
    from the extended job ``prior``."""
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


def reused_checkpoints(prior: JobLayout | None, cfg: JobConfig, layout: JobLayout) -> int:
    """How many leading checkpoints of the job ``layout`` (config ``cfg``) the finished job ``prior`` scored (0
    without one): their components, shared quantities and features are reused, since a checkpoint's components
    never depend on the others. ``prior`` must have the same config but for the trajectory, and its checkpoints
    (path, step, learning rates, file contents) must be the first ones of ``layout``'s, fewer than all of them.
    Jobs from before the contents were recorded (no ``sha256`` in their trajectory.json) are matched without them.
    The samples the shared quantities are computed from are checked by :func:`check_shared_inputs`."""
    if prior is None:
        return 0
    prior_cfg = load_job_config(prior.config)
    if cfg.model_copy(update={"trajectory": prior_cfg.trajectory}).fingerprint() != prior_cfg.fingerprint():
        raise ValueError(f"{prior.root} was scored with another config than this job's (beyond the trajectory): its "
                         f"components would not combine with the new ones (fix: run a full job)")
    done = json.loads(prior.trajectory.read_text())["checkpoints"]
    mine = json.loads(layout.trajectory.read_text())["checkpoints"]
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
    None, and nothing read, when neither record exists (a job's first run: the shared-quantity actor, which reads
    those samples anyway, supplies the record).

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


def shared_phase(cfg: JobConfig, layout: JobLayout, traj: Trajectory, pool: list[str], target: list[str],
                 picked: dict[str, str] | None, first: int, Shared, cpus: float, wait_placed,
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
    m = len(traj.checkpoints)
    refs: dict[int, object] = {}
    todo = [i for i in range(first, m) if not layout.shared(i).exists()]
    sub_path = layout.oga_subsample
    need_oga = "oga" in cfg.scores.methods and not sub_path.exists()
    comps = []
    try:  # the actors are killed however this ends: a pending resource request would otherwise stay queued
        if todo or need_oga:
            cfg_dict = cfg.model_dump(mode="json")
            comps = [Shared.remote(cfg_dict, traj, pool, target, cpus, first)
                     for _ in range(max(1, min(n_workers, len(todo) or n_workers)))]
            wait_placed([c.ping.remote() for c in comps], "the shared-quantity actors")
            if not layout.shared_inputs.exists():  # the record of what the shared quantities are computed from
                write_json_atomic(layout.shared_inputs, picked or ray.get(comps[0].input_digests.remote()))
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
            with atomic_path(sub_path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.concatenate(parts).astype(np.float32, copy=False))
    finally:
        for c in comps:
            ray.kill(c)
    forest = None
    if "oga" in cfg.scores.methods:
        forest = fit_isolation_forest(np.load(sub_path), seed=cfg.seed, trees=cfg.scores.oga.iforest_trees)
    return [refs[i] for i in range(first, m)], forest


def _prior_components(prior: JobLayout | None, url: str, first: int):
    """The uids and stored components of checkpoints 0..first-1 of a shard of the job being extended (None without
    one), read by the driver and shipped to the actor, so the actors need no shared filesystem for outputs."""
    if prior is None:
        return None
    path = prior.scores(url)
    return pq.read_table(path, columns=["uid", *component_columns(pq.read_schema(path).names, first)])


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


def score_all(cfg: JobConfig, layout: JobLayout, pool: list[str], target: list[str], traj: Trajectory,
              prior: JobLayout | None = None) -> dict:
    """Score every pending shard: those without a score file, and those whose file changed since they were scored
    (another size, modification time or ETag: a repaired shard), whose outputs are replaced. Returns run statistics
    (failed shards included; ``shards_changed``: the shards scored again because they changed).

    ``prior``: a finished job of the same config whose trajectory is a prefix of ``traj`` (see
    :func:`reused_checkpoints`): only the later checkpoints are loaded and computed, on the same actors, and each
    shard's scores combine its stored components with the new ones, as a full run would."""
    identities = shard_identities(pool)  # before any shard is read: a shard re-written meanwhile is scored again
    missing, changed = layout.stale_shards(pool, identities)
    if changed:
        log.warning("%d shard(s) changed since they were scored (size, modification time or ETag differ), scoring "
                    "them again: %s", len(changed), ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
    stale = set(missing) | set(changed)
    pending = [u for u in pool if u in stale]
    first = reused_checkpoints(prior, cfg, layout)
    picked = check_shared_inputs(cfg, layout, pool, target, prior, pending)
    stats = {"shards_total": len(pool), "shards_skipped": len(pool) - len(pending), "shards_changed": len(changed),
             "shards_failed": {}, "failed_attempts": {}, "actors": 0, "gpus": 0, "checkpoints_reused": first,
             "job": layout.root.name, **({"extends": str(prior.root)} if prior else {})}
    if not pending:
        log.info("all %d shards already scored in %s", len(pool), layout.root)
        return stats
    unscored, changed_since = prior.stale_shards(pending, identities) if prior is not None else ([], [])
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
    # a checkpoint's weights depend only on it and its predecessor (checkpoint_weights), so the reused states' eta
    # and a_t are this job's; scores are weighted by this job's trajectory.json, which explain reads too
    for i in range(first):
        if not layout.shared(i).exists():
            link_or_copy(prior.shared(i), layout.shared(i))
    connect_ray(cfg)
    n_actors, gpus = actor_plan(cfg)
    cpus = cfg.ray.cpus_per_actor
    Shared, Scorer = remote_classes(num_gpus=1 if gpus else 0, num_cpus=cpus, max_restarts=8)
    cfg_dict = cfg.model_dump(mode="json")
    stats.update(actors=n_actors, gpus=gpus)
    wait_placed = placement_guard(cfg, gpus_per_actor=1 if gpus else 0)
    metrics = _metrics()

    t0 = time.time()
    state_refs, forest = shared_phase(cfg, layout, traj, pool, target, picked, first, Shared, cpus, wait_placed,
                                      n_actors)
    stats["shared_seconds"] = time.time() - t0

    shared = [state_refs, ray.put(forest)]  # sent with each task, nested: Ray passes the refs unresolved
    t_actors = time.time()
    actors = [Scorer.remote(cfg_dict, traj, cpus, first) for _ in range(n_actors)]
    # inflight: object ref -> (shard url, actor) for a scoring task, (None, actor) for a readiness probe (ping) of
    # a new actor or of one whose task died with it: an actor takes shards only once its probe has answered
    queue, idle, inflight = deque(pending), [], {a.ping.remote(): (None, a) for a in actors}
    # Scoring starts once every actor is ready (so score_seconds is the scoring phase, start-up excluded), or
    # ACTOR_START_GRACE_S after the first one was ready: a straggler that cannot be placed joins when it can.
    done_samples, t1, first_ready = 0, None, None
    bar = tqdm(total=len(pending), desc="shards", unit="shard", dynamic_ncols=True)

    def failed_attempt(url: str, err: str, retry: bool = True, trace: str | None = None) -> None:
        """Count a failed attempt; requeue the shard, or give it up (``err``: a clean one-line message, stored in
        ``shards_failed``; ``trace``: the task's traceback, stored in ``failure_tracebacks``)."""
        n = stats["failed_attempts"][url] = stats["failed_attempts"].get(url, 0) + 1
        metrics["attempts_failed"].inc()
        if retry and n <= cfg.ray.max_retries:
            log.warning("shard %s failed (attempt %d), retrying: %s", url, n, err[:300])
            queue.append(url)
        else:
            log.error("shard %s failed %d time(s), giving up: %s", url, n, err[:300])
            stats["shards_failed"][url] = err[:2000]
            if trace:
                stats.setdefault("failure_tracebacks", {})[url] = trace[-20000:]
            metrics["shards_failed"].inc()
            bar.update(1)

    try:
        wait_placed(list(inflight), f"none of the {n_actors} scoring actors")
    except PlacementError:
        for a in actors:
            ray.kill(a)
        raise
    while queue or any(url is not None for url, _ in inflight.values()):
        waited = time.time() - first_ready if first_ready is not None else 0.0
        if t1 is None and (not inflight or waited > ACTOR_START_GRACE_S):
            t1 = time.time()
            stats.update(actor_start_seconds=t1 - t_actors, actors_ready_at_start=len(idle))
            log.info("%d of %d scoring actors ready after %.1fs", len(idle), len(actors), t1 - t_actors)
        while t1 is not None and queue and idle:
            actor, url = idle.pop(), queue.popleft()
            inflight[actor.score_shard.remote(url, shared, _prior_components(prior, url, first))] = (url, actor)
        if not inflight:  # every actor is dead for good: report the rest instead of waiting forever
            while queue:
                url = queue.popleft()
                stats["shards_failed"][url] = "no scoring actor left (every actor died more often than max_restarts)"
                metrics["shards_failed"].inc()
                bar.update(1)
            break
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=None if t1 is not None else 1.0)
        for ref in ready:
            url, actor = inflight.pop(ref)
            if url is None:  # a readiness probe
                try:
                    ray.get(ref)
                    idle.append(actor)
                    first_ready = first_ready or time.time()
                except ray.exceptions.ActorUnavailableError:  # still restarting or unreachable: ask again
                    time.sleep(0.5)
                    inflight[actor.ping.remote()] = (None, actor)
                except ray.exceptions.RayError as e:  # dead for good (restarts exhausted, constructor failed)
                    log.error("a scoring actor is dead for good, continuing without it: %s", str(e)[:300])
                continue
            try:
                _, table, feats, hzg, rejects, st = ray.get(ref)
            except ray.exceptions.RayError as e:
                # the task raised, or its actor died with it (Ray restarts the actor), or the result was lost with
                # its node: either way the actor takes new work only once it answers a ping
                inflight[actor.ping.remote()] = (None, actor)
                # deterministic failures are the same on every retry and every node: reported at once
                failed_attempt(url, failure_message(e), retry=not isinstance(e, (ShardChangedError, ShardNotATarError)),
                               trace=clean_traceback(str(e)))
                continue
            idle.append(actor)
            try:
                _write_shard_result(layout, url, table, feats, hzg, rejects, identities[url], prior, first)
            except ValueError as e:  # e.g. features that overflow float16: deterministic, fails every retry
                failed_attempt(url, f"{type(e).__name__}: {e}")
                continue
            done_samples += st["n"]
            bar.update(1)
            bar.set_postfix(samples=done_samples, rate=f"{done_samples / max(time.time() - t1, 1e-9):.1f}/s")
    bar.close()
    stats["score_seconds"] = time.time() - (t1 or time.time())  # the scoring phase: actor start-up excluded
    for a in actors:
        ray.kill(a)
    stats["samples_scored_this_run"] = done_samples
    return stats
