"""Ray actors: thin wrappers that move shards into a :class:`pruner.scorer.Scorer` and results back out
(:func:`pruner.distributed.shard_tasks.score_shard`, which the local runner calls too).

Actors return results to the driver (which writes them), so a multi-node cluster needs no shared
filesystem for outputs; only the input shards must be readable from every node.
"""
from __future__ import annotations

import logging
import os

import ray
from ray.util.metrics import Counter

from pruner.config import JobConfig
from pruner.distributed.shard_tasks import score_shard
from pruner.model.checkpoints import Trajectory
from pruner.scorer import Scorer, input_digests, pick_shared_inputs, uses_propagation
from pruner.scores.shared import CheckpointShared

log = logging.getLogger("pruner.actor")


def _setup(cfg_dict: dict, cpus: float):
    # warnings and errors only: Ray forwards what workers print to the driver's console, which shows the driver's
    # progress instead (pruner.logs)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch
    torch.set_num_threads(max(1, int(cpus)))
    return JobConfig.model_validate(cfg_dict)


def fetch_shared(state_refs: list) -> list[CheckpointShared]:
    """The shared quantities behind a list of object refs (one per checkpoint), fetched and rebuilt one at a time
    (the refs are nested in a list, so Ray passes them unresolved)."""
    return [CheckpointShared.from_state(ray.get(r)) for r in state_refs]


class SharedComputer:
    """Computes the per-checkpoint shared quantities and fits the OGA forest, once per job."""

    def __init__(self, cfg_dict: dict, traj: Trajectory, pool_urls: list[str], target_urls: list[str], cpus: float,
                 first: int = 0):
        self.cfg = _setup(cfg_dict, cpus)
        self.scorer = Scorer(self.cfg, traj, first=first)  # checkpoints first.. (see Scorer)
        self.inputs = pick_shared_inputs(self.cfg, pool_urls, target_urls, curvature=uses_propagation(self.cfg),
                                         oga="oga" in self.cfg.scores.methods)

    def ping(self) -> int:
        return os.getpid()

    def input_digests(self) -> dict[str, str]:
        """What ``shared/inputs.json`` records of the samples picked here (pruner.scorer.input_digests), so the
        driver need not read and decode them as well on a job's first run."""
        return input_digests(self.inputs)

    def compute(self, i: int) -> dict:
        bank, target, reference, curvature, _ = self.inputs
        return self.scorer.compute_shared(i, bank, target, reference, curvature or ()).to_state()

    def oga_subsample_size(self) -> int:
        return len(self.inputs.oga)

    def oga_features(self, state_refs: list, start: int, stop: int):
        """Projected gradients [stop - start, k] of rows start:stop of the hash-selected OGA subsample at the last
        checkpoint; ``state_refs``: object refs of the shared quantities of checkpoints ``first``..
        (:func:`fetch_shared`). The driver splits the rows at multiples of the batch size, so every actor forms
        the batches one actor would (identical features whatever the number of actors)."""
        self.scorer.set_shared(fetch_shared(state_refs))
        return self.scorer.last_checkpoint_features(self.inputs.oga[start:stop])


class ShardScorer:
    """Scores whole shards. Constructed with the config and trajectory only (it loads the models), so a restarted
    actor is ready again; the shared quantities and the OGA forest come with each task as object refs (nested in a
    list, so Ray passes them unresolved) and are fetched once per actor life. Large constructor arguments would sit
    in the object store for every restart (Ray warns about that on the console)."""

    def __init__(self, cfg_dict: dict, traj: Trajectory, cpus: float, first: int = 0):
        self.cfg = _setup(cfg_dict, cpus)
        self.scorer = Scorer(self.cfg, traj, first=first)
        self.samples_scored = Counter("pruner_samples_scored", description="samples scored")
        self.shards_done = Counter("pruner_shards_done", description="shards scored")
        self.pid = os.getpid()

    def ping(self) -> int:
        return self.pid

    def score_shard(self, url: str, shared: list, prior=None):
        """Returns (url, score table, [P g per scored checkpoint], [P H_z G per scored checkpoint], rejects table,
        stats). ``shared``: [object refs of the shared quantities of checkpoints ``first``.. (see
        :class:`pruner.scorer.Scorer`), object ref of the OGA forest]; ``prior``: the shard's score table in the job
        being extended, when ``first`` > 0."""
        if not self.scorer.scorers:
            self.scorer.set_shared(fetch_shared(shared[0]))
            self.scorer.forest = ray.get(shared[1])
        result = score_shard(self.scorer, self.cfg, url, prior)
        self.samples_scored.inc(result[-1]["n"])
        self.shards_done.inc()
        result[-1]["actor_pid"] = self.pid
        return result


def remote_classes(num_gpus: float, num_cpus: float, max_restarts: int):
    """The Ray actor classes with their resource requests."""
    opts = dict(num_cpus=num_cpus, num_gpus=num_gpus)
    return (ray.remote(**opts)(SharedComputer),
            ray.remote(max_restarts=max_restarts, max_task_retries=0, **opts)(ShardScorer))
