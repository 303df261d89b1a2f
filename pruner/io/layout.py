"""The one definition of a job's output directory and of shard identities.

    <output_dir>/<job name>-<job id>/
        config.yaml                 the resolved config that produced this directory
        trajectory.json             checkpoints used (path, step, lr, file sha256, lr weight, a_t, b_t)
        shared/ckpt-<i>.pt          per-checkpoint shared vectors (bank, v_t, G_B, u_t), weights_only tensors
        shared/inputs.json          sha256 of the uids of the hash-picked bank, reference and target samples
        shards/<shard id>.parquet   per-shard scores (one row per accepted sample)
        shards/<shard id>.c<i>.npy  optional fp16 projected gradients [n, k] at checkpoint i, row-aligned
        shards/<shard id>.c<i>.hzg.npy  optional fp16 projected H_z G_B [n, k] (re-targeting the taylor form)
        shards/<shard id>.rejects.parquet   samples the reader skipped, with reasons
        ranking.parquet             every sample, all scores and its rank
        keep/                       manifests: manifest.json, uids.npy, keep.parquet
        summary.json
        explain/results/<query id>.json   the latest `pruner explain` result per query (shown by `pruner report`)
        clusters.parquet, clusters.json   `pruner cluster`: each sample's gradient cluster; per-cluster summaries
"""
from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path


def shard_id(url: str) -> str:
    """A filesystem-safe, stable id for a shard URL: ``<basename without extension>-<sha1(url)[:10]>``."""
    base = posixpath.basename(url.rstrip("/")) or "shard"
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:80]
    return f"{safe}-{hashlib.sha1(url.encode()).hexdigest()[:10]}"


CLUSTERS_PARQUET = "clusters.parquet"
CLUSTERS_JSON = "clusters.json"


@dataclass(frozen=True)
class JobLayout:
    root: Path

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def shared_dir(self) -> Path:
        return self.root / "shared"

    @property
    def keep_dir(self) -> Path:
        return self.root / "keep"

    def scores(self, url: str) -> Path:
        return self.shards_dir / f"{shard_id(url)}.parquet"

    def rejects(self, url: str) -> Path:
        return self.shards_dir / f"{shard_id(url)}.rejects.parquet"

    def features(self, url: str, checkpoint: int) -> Path:
        return self.shards_dir / f"{shard_id(url)}.c{checkpoint}.npy"

    def hzg(self, url: str, checkpoint: int) -> Path:
        """fp16 projected Hessian-gradient products P H_z G_B [n, k] (``features.save_hzg``)."""
        return self.shards_dir / f"{shard_id(url)}.c{checkpoint}.hzg.npy"

    def shared(self, checkpoint: int) -> Path:
        return self.shared_dir / f"ckpt-{checkpoint}.pt"

    @property
    def shared_inputs(self) -> Path:
        return self.shared_dir / "inputs.json"

    @property
    def ranking(self) -> Path:
        return self.root / "ranking.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def trajectory(self) -> Path:
        return self.root / "trajectory.json"

    @property
    def explain_results(self) -> Path:
        """The folder of saved ``pruner explain`` results, one ``<query id>.json`` per query."""
        return self.root / "explain" / "results"

    @property
    def clusters_summary(self) -> Path:
        """``pruner cluster``'s per-cluster summaries (:mod:`pruner.explain.cluster`)."""
        return self.root / CLUSTERS_JSON
