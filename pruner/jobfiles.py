"""Reading a job directory: the one place that opens a job's config, trajectory record, shared states and summary
and derives its pool from them. Paths come from :class:`pruner.io.layout.JobLayout` (which owns the directory's
shape); writers are the job's stages (pruner.jobs.jobdir writes config.yaml and trajectory.json, the runners the
score tables and shared states, pruner.select.reduce the ranking, keep set and summary).

The Parquet tables (score files, ranking, keep set) are read by their consumers through the layout's paths, each
in the streaming way it needs (pruner.select, pruner.rescore, pruner.report).

Used by the commands that work on an existing job (rescore, explain, deletion, policies, report) and by the
resume checks (pruner.jobs.resume), so each reads a job the same way: the config as the job stored it (select: the
last applied), the weights its scores used (trajectory.json, not recomputed), the pool its config expands to now.
Imports no torch until a shared state is read: a driver refused at its lock check must not pay for it.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import yaml

from pruner.config import JobConfig, load_job_config
from pruner.io.layout import JobLayout
from pruner.io.shards import expand_shard_specs
from pruner.model.checkpoints import Trajectory, load_trajectory
from pruner.scores.step_scales import step_scale_of


class JobFiles:
    """A job directory, read. ``job``: its path or its :class:`JobLayout`. Nothing is read until asked for; the
    config and the trajectory record are read once."""

    def __init__(self, job: str | Path | JobLayout):
        self.layout = job if isinstance(job, JobLayout) else JobLayout(Path(job))

    @property
    def root(self) -> Path:
        return self.layout.root

    @cached_property
    def config(self) -> JobConfig:
        """The job's config.yaml, validated. FileNotFoundError (naming the fix) when the directory is no job."""
        if not self.layout.config.exists():
            raise FileNotFoundError(f"{self.root} is not a pruner job directory (no config.yaml; fix: point to "
                                    f"<output_dir>/<name>-<id> of a `pruner prune` run)")
        return load_job_config(self.layout.config)

    @cached_property
    def checkpoint_records(self) -> list[dict]:
        """trajectory.json's per-checkpoint records (path, step, lr, lr_mean, sha256, updates, eta, a_t, b_t): the
        weights the job's scores were combined with."""
        if not self.layout.trajectory.exists():
            raise FileNotFoundError(f"{self.layout.trajectory} does not exist: {self.root} is not a scored job "
                                    f"directory (fix: point to <output_dir>/<name>-<id> of a finished `pruner prune`)")
        return json.loads(self.layout.trajectory.read_text())["checkpoints"]

    def etas(self) -> list[float]:
        """eta_i per checkpoint (the learning rate summed over its interval), as the job's scores used them."""
        return [float(c["eta"]) for c in self.checkpoint_records]

    def pool_size(self) -> float | None:
        """N, the pool size the weights were formed with (b_t = eta / N); None when the first checkpoint's weights
        are 0 (a zero learning rate over its interval), which leave N undetermined."""
        first = self.checkpoint_records[0]
        b = float(first["b_t"])
        return float(first["eta"]) / b if b else None

    def trajectory(self) -> Trajectory:
        """The checkpoints the config names (their files and metadata)."""
        t = self.config.trajectory
        return load_trajectory(file=t.file, checkpoints=t.checkpoints or None)

    def pool(self, scored_only: bool = False) -> list[str]:
        """The shard URLs the config's ``data.shards`` expands to now; with ``scored_only``, those that have a score
        file (the pool as the job scored it)."""
        data = self.config.data
        urls = expand_shard_specs(data.shards, data.allow_pipe)
        return [u for u in urls if self.layout.scores(u).exists()] if scored_only else urls

    def shard_urls(self, specs: list[str]) -> list[str]:
        """Other shard specs (a target set) expanded as the job's config allows (``data.allow_pipe``)."""
        return expand_shard_specs(list(specs), self.config.data.allow_pipe)

    def require_shared(self, m: int) -> None:
        """FileNotFoundError naming every missing shared state of checkpoints 0..m-1 (before any is loaded)."""
        missing = [str(self.layout.shared(i)) for i in range(m) if not self.layout.shared(i).exists()]
        if missing:
            raise FileNotFoundError(f"shared quantities {missing} are missing (fix: finish the job first)")

    def shared_state(self, i: int, mmap: bool = False) -> dict:
        """Checkpoint i's saved shared quantities as plain tensors (weights_only; ``mmap``: memory-mapped)."""
        from pruner.scores.shared import load_state
        path = self.layout.shared(i)
        if not path.exists():
            raise FileNotFoundError(f"shared quantities {path} are missing (fix: finish the job first)")
        return load_state(path, mmap=mmap)

    def shared(self, i: int, device="cpu"):
        """Checkpoint i's shared quantities (pruner.scores.shared.CheckpointShared) on ``device``."""
        from pruner.scores.shared import CheckpointShared
        return CheckpointShared.from_state(self.shared_state(i), device)

    def step_scales(self) -> list[dict]:
        """Per checkpoint, the optimiser step scale Diff-In's propagated form used and where it came from:
        {"checkpoint", "step_scale", "source"} (pruner.scores.step_scales.step_scale_of); [] for a job
        whose shared states hold none (another form, or no shared state written yet)."""
        out = []
        for i in range(len(self.checkpoint_records)):
            if not self.layout.shared(i).exists():
                return []
            s = self.shared_state(i, mmap=True)
            if "curvature_vals" not in s:
                return []
            scale, source = step_scale_of(s)
            out.append({"checkpoint": i, "step_scale": scale, "source": source})
        return out

    def trusted_pipes(self) -> frozenset[str]:
        """The ``pipe:`` commands the job's ``config.yaml`` lists in ``data.shards``, if it sets ``data.allow_pipe``:
        the ones the job ran, and so the only ones reading captions, labels and images back from its shards may run.
        A ``pipe:`` URL found anywhere else (a score file, a saved explain result) is not run: those files are data,
        and whoever can write them must not get commands run. Reads the two keys alone (no validation of the rest,
        so a job whose config no longer validates can still be read)."""
        path = self.layout.config
        data = (yaml.safe_load(path.read_text()) or {}).get("data") if path.exists() else None
        if not isinstance(data, dict) or data.get("allow_pipe") is not True:
            return frozenset()
        shards = data.get("shards")
        specs = [shards] if isinstance(shards, str) else shards if isinstance(shards, list) else []
        return frozenset(s for s in specs if isinstance(s, str) and s.startswith("pipe:"))

    def summary(self) -> dict:
        """summary.json (written last by the reduce step); {} before a job's first reduce."""
        return json.loads(self.layout.summary.read_text()) if self.layout.summary.exists() else {}
