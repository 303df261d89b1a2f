"""A job's directory, found and created without loading a model or starting Ray.

The directory is ``<output_dir>/<name>-<job id>``; the job id hashes what changes the scores (:func:`job_id`).
:func:`resolve_job` finds it (listing the shards, reading the trajectory's metadata and hashing the checkpoint files)
with no side effect, so a driver can be refused at once when another one holds the directory's lock, before it
loads models or creates anything (pruner.jobs.prune); :func:`create_job_dir` then writes ``config.yaml`` and
``trajectory.json``. Imports neither torch nor Ray (checkpoint lists load torch lazily, for their metadata).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pruner.config import ConfigError, JobConfig
from pruner.io.atomic import write_bytes_atomic, write_json_atomic
from pruner.io.layout import JobLayout, JobRefusedError
from pruner.io.shards import check_shard_names, expand_shard_specs
from pruner.model.checkpoints import Trajectory, load_trajectory
from pruner.scores.weights import CheckpointWeights, checkpoint_weights


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def job_id(cfg: JobConfig, target: list[str], traj: Trajectory, digests: list[str],
           weights: list[CheckpointWeights]) -> str:
    """16 hex digits from the config fingerprint (which holds the pool's shard *specs*, and not ``select``), the
    target shard list, the checkpoint file contents (``digests``, sha256 per checkpoint) and the checkpoint weights
    (``checkpoint_weights``; so a change of the weighting rule never mixes differently weighted shards in one
    directory). The expanded pool list
    is deliberately left out: when a folder or glob of the lake gains shards, re-running the same config reuses the
    job directory and scores only the new shards (incremental re-scoring; see pruner.rescore). So are the select
    settings: a re-run with other ones reuses the directory and only re-selects (pruner.jobs.prune.run)."""
    h = hashlib.sha256()
    h.update(cfg.fingerprint().encode())
    h.update(json.dumps(target).encode())
    for ck, digest, w in zip(traj.checkpoints, digests, weights):
        h.update(json.dumps([ck.step, ck.lr, ck.lr_mean, w.eta, w.a_t, w.b_t]).encode())
        h.update(digest.encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ResolvedJob:
    """Everything a run needs to know before it loads a model: the directory, the pool and target shard lists, the
    trajectory, its weights and the checkpoint files' digests."""

    layout: JobLayout
    pool: list[str]
    target: list[str]
    traj: Trajectory
    weights: list[CheckpointWeights]
    digests: list[str]


def resolve_job(cfg: JobConfig) -> ResolvedJob:
    """The job ``cfg`` maps to, without side effects. Raises :class:`pruner.config.ConfigError` (exit 2) when the
    trajectory or a checkpoint's metadata cannot be read, and :class:`JobRefusedError` (exit 1 with the fix) for
    inputs no run of this config could score: clashing shard names, a checkpoint at step 0."""
    try:
        traj = load_trajectory(file=cfg.trajectory.file, checkpoints=cfg.trajectory.checkpoints or None)
    except (OSError, ValueError) as e:
        key = "trajectory.file" if cfg.trajectory.file else "trajectory.checkpoints"
        raise ConfigError(f"invalid job config: \n  {key}: {e}") from None
    try:  # refused before a directory exists
        pool = expand_shard_specs(cfg.data.shards, cfg.data.allow_pipe)
        target = expand_shard_specs(cfg.target.shards, cfg.data.allow_pipe) if cfg.target.shards else []
        check_shard_names(pool)
        weights = checkpoint_weights(cfg, traj)
    except ValueError as e:
        raise JobRefusedError(str(e)) from None
    digests = [file_digest(ck.path) for ck in traj.checkpoints]
    layout = JobLayout(Path(cfg.output_dir) / f"{cfg.name}-{job_id(cfg, target, traj, digests, weights)}")
    return ResolvedJob(layout, pool, target, traj, weights, digests)


def write_job_config(layout: JobLayout, cfg: JobConfig) -> None:
    """``config.yaml``: the resolved config. Written when the job directory is created, and again by the reduce
    step of every run, so its select settings are the ones the ranking and keep set were made with (they are not
    part of the job id)."""
    write_bytes_atomic(layout.config, cfg.to_yaml())


def create_job_dir(cfg: JobConfig, job: ResolvedJob) -> None:
    """Create the job directory with its ``config.yaml`` and ``trajectory.json`` (the audit record of the
    per-checkpoint weights behind every score), keeping those of an earlier run."""
    layout = job.layout
    layout.shards_dir.mkdir(parents=True, exist_ok=True)
    if not layout.config.exists():
        write_job_config(layout, cfg)
    if not layout.trajectory.exists():
        write_json_atomic(layout.trajectory, {"arch": job.traj.arch or cfg.model.arch, "checkpoints": [
            {**ck.record(), "sha256": digest, "updates": w.updates, "eta": w.eta, "a_t": w.a_t, "b_t": w.b_t}
            for ck, digest, w in zip(job.traj.checkpoints, job.digests, job.weights)]})


def prepare(cfg: JobConfig) -> tuple[JobLayout, list[str], list[str], Trajectory]:
    """:func:`resolve_job` and :func:`create_job_dir`: (layout, pool, target shards, trajectory)."""
    job = resolve_job(cfg)
    create_job_dir(cfg, job)
    return job.layout, job.pool, job.target, job.traj
