"""``pruner cluster``: spherical k-means of the pool in TracIn gradient space (methods §2.1, "cosine TracIn").

Each sample is embedded as ``concat_i sqrt(eta_i) P g_i(z) / ||P g_i(z)||``, scaled to unit norm (the "unit"
view of :mod:`pruner.explain.pool`): per-checkpoint normalisation keeps high-norm (outlier) gradients from dominating,
the learning-rate weights keep TracIn's checkpoint weighting. ``faiss.Kmeans(spherical=True)`` is trained on a
seeded sample (at most 256 points per centroid, ``train_size`` in all) and every sample is then assigned to its
nearest centroid by cosine, streaming the features in batches. Progress bars on stderr: the assignment (samples)
and the pass over the shards for labels and captions (shards).

Writes, atomically, into the job directory:

* ``clusters.parquet``: uid, key, shard_url, row, cluster (int32), cosine (float32, to its centroid), label
  (``str(json[label_key])`` or null), one row per sample in id order;
* ``clusters.json``: parameters, the k-means objective, and per cluster: size, the ``typical`` samples closest to
  the centroid (uid, key, shard_url, cosine, caption), the mean of every score column, and the share of each
  label (when the json metadata has ``label_key``).

Memory: the training sample (train_size x m k x 4 bytes) + one batch + 8 bytes per sample (cluster, cosine) + the
label column (4 bytes per sample) + one shard's texts while reading labels and captions.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pruner.explain.index import _want_gpu, num_gpus, train_sample_ids
from pruner.explain.pool import PoolFeatures, sample_labels
from pruner.jobfiles import JobFiles
from pruner.io.atomic import atomic_path, write_json_atomic
from pruner.io.layout import JobLayout
from pruner.scores.combine import method_columns

CLUSTER_SCHEMA = pa.schema([("uid", pa.string()), ("key", pa.string()), ("shard_url", pa.string()),
                            ("row", pa.int32()), ("cluster", pa.int32()), ("cosine", pa.float32()),
                            ("label", pa.string())])


def spherical_kmeans(x: np.ndarray, n_clusters: int, niter: int = 20, seed: int = 0, use_gpu="auto") -> faiss.Kmeans:
    """faiss spherical k-means on unit rows float32 [t, d]; deterministic for a seed (CPU)."""
    km = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=256, gpu=_want_gpu(use_gpu))
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km


def assign(pool: PoolFeatures, centroids: np.ndarray, batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(cluster int32 [n], cosine float32 [n]): the nearest unit centroid of every sample."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    cluster = np.zeros(pool.n, np.int32)
    cosine = np.zeros(pool.n, np.float32)
    with tqdm(total=pool.n, desc="assign clusters", unit="sample", dynamic_ncols=True) as bar:
        for start, x in pool.batches(batch_rows, weighting="unit"):
            d, i = index.search(x, 1)
            cluster[start:start + len(x)] = i[:, 0]
            cosine[start:start + len(x)] = d[:, 0]
            bar.update(len(x))
    return cluster, cosine


def _mean_scores(pool: PoolFeatures, cluster: np.ndarray, n_clusters: int) -> dict[str, np.ndarray]:
    """Per cluster, the mean of every method score column over its samples with a finite score."""
    cols = method_columns(pq.read_schema(pool.files[0]).names)
    sums = {c: np.zeros(n_clusters) for c in cols}
    counts = {c: np.zeros(n_clusters) for c in cols}
    for fi, f in enumerate(pool.files):
        t = pq.read_table(f, columns=cols)
        cl = cluster[pool.offsets[fi]:pool.offsets[fi + 1]]
        for c in cols:
            v = t[c].to_numpy(zero_copy_only=False).astype(np.float64)
            ok = np.isfinite(v)
            sums[c] += np.bincount(cl[ok], weights=v[ok], minlength=n_clusters)
            counts[c] += np.bincount(cl[ok], minlength=n_clusters)
    return {c: np.divide(sums[c], counts[c], out=np.full(n_clusters, np.nan), where=counts[c] > 0) for c in cols}


def cluster_pool(job_dir: str | Path, n_clusters: int = 100, *, niter: int = 20, seed: int = 0,
                 train_size: int = 262144, batch_rows: int = 65536, typical: int = 5,
                 label_key: Optional[str] = "classname", read_shards: bool = True, use_gpu="auto",
                 write: bool = True) -> dict:
    """Cluster a finished job's pool (module docstring). ``read_shards=False`` skips reading the shards (no labels,
    no captions). Returns the clusters.json dict (plus ``"cluster"``/``"cosine"`` arrays under ``"_arrays"``)."""
    t0 = time.time()
    root = Path(job_dir)
    pool = PoolFeatures.open(root)
    if not 1 <= n_clusters <= pool.n:
        raise ValueError(f"n_clusters must be in [1, {pool.n}] (the pool size), got {n_clusters}")
    ids = train_sample_ids(pool.n, min(pool.n, 256 * n_clusters, train_size), seed)
    x = pool.gather(ids, weighting="unit")
    x = x[np.linalg.norm(x, axis=1) > 0]
    if len(x) < n_clusters:
        raise ValueError(f"only {len(x)} samples with a non-zero gradient for {n_clusters} clusters")
    km = spherical_kmeans(x, n_clusters, niter, seed, use_gpu)
    n_train = len(x)
    del x
    cluster, cosine = assign(pool, km.centroids, batch_rows)

    sizes = np.bincount(cluster, minlength=n_clusters)
    order = np.lexsort((np.arange(pool.n), -cosine, cluster))
    first = np.searchsorted(cluster[order], np.arange(n_clusters))
    typical_ids = {c: order[first[c]:first[c] + min(typical, int(sizes[c]))] for c in range(n_clusters)}
    want = np.concatenate(list(typical_ids.values())) if typical_ids else np.zeros(0, np.int64)
    if read_shards:
        labels, captions = sample_labels(pool.files, label_key, want, JobFiles(root).trusted_pipes())
    else:
        labels, captions = pa.nulls(pool.n, pa.dictionary(pa.int32(), pa.string())), {}
    has_labels = labels.null_count < len(labels)
    means = _mean_scores(pool, cluster, n_clusters)

    share: dict[int, dict[str, float]] = {}
    if has_labels:
        codes = labels.indices.to_numpy(zero_copy_only=False)
        valid = labels.is_valid().to_numpy(zero_copy_only=False)
        names = labels.dictionary.to_pylist()
        counts = np.zeros((n_clusters, len(names)), np.int64)
        np.add.at(counts, (cluster[valid], codes[valid].astype(np.int64)), 1)
        for c in range(n_clusters):
            share[c] = {names[j]: float(counts[c, j] / sizes[c]) for j in np.argsort(-counts[c], kind="stable")
                        if counts[c, j]}
    recs = pool.records(want) if len(want) else []
    rec_of = dict(zip(want.tolist(), recs))
    cos_sum = np.bincount(cluster, weights=cosine.astype(np.float64), minlength=n_clusters)
    clusters = []
    for c in range(n_clusters):
        clusters.append({
            "cluster": c, "size": int(sizes[c]),
            "mean_cosine": float(cos_sum[c] / sizes[c]) if sizes[c] else None,
            "typical": [{"uid": rec_of[int(i)]["uid"], "key": rec_of[int(i)]["key"],
                         "shard_url": rec_of[int(i)]["shard_url"], "cosine": float(cosine[i]),
                         "caption": captions.get(int(i))} for i in typical_ids[c]],
            "mean_scores": {k: (None if np.isnan(v[c]) else float(v[c])) for k, v in means.items()},
            **({"label_share": share.get(c, {})} if has_labels else {}),
        })
    summary = {
        "n_samples": pool.n, "n_clusters": n_clusters, "niter": niter, "seed": seed, "train_size": n_train,
        "dim": pool.dim, "etas": pool.etas,
        "embedding": "concat_i sqrt(eta_i) P g_i / ||P g_i||, unit norm (spherical k-means, cosine)",
        "objective": float(km.obj[-1]) if len(km.obj) else None,
        "label_key": label_key if has_labels else None, "gpus": num_gpus(),
        "seconds": time.time() - t0, "clusters": clusters,
    }
    if write:
        with atomic_path(JobLayout(root).clusters_table) as tmp, pq.ParquetWriter(tmp, CLUSTER_SCHEMA) as w:
            dense = labels.cast(pa.string())
            for fi, f in enumerate(pool.files):
                a, b = int(pool.offsets[fi]), int(pool.offsets[fi + 1])
                t = pq.read_table(f, columns=["uid", "key", "shard_url", "row"])
                w.write_table(pa.table({"uid": t["uid"], "key": t["key"], "shard_url": t["shard_url"],
                                        "row": t["row"].cast(pa.int32()), "cluster": pa.array(cluster[a:b]),
                                        "cosine": pa.array(cosine[a:b]), "label": dense.slice(a, b - a)},
                                       schema=CLUSTER_SCHEMA))
        write_json_atomic(JobLayout(root).clusters_summary, summary)
    return {**summary, "_arrays": {"cluster": cluster, "cosine": cosine, "labels": labels}}
