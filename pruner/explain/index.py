"""faiss inner-product indexes over a job's stored projected gradients (TracIn proponent/opponent search).

The indexed vector of sample z is ``concat_i sqrt(eta_i) P g_i(z)`` (:mod:`pruner.explain.pool`, "tracin" view), so
``<q, x_z>`` is the TracIn score of z for a query built the same way. Kinds (``kind="auto"`` picks by pool size n):

=========  ================================  ================================  =====================================
kind       auto for                          memory per vector (d = m k)       search
=========  ================================  ================================  =====================================
flat       n < 1M and 4 n d <= 4 GiB         4 d bytes (IndexFlatIP)           exact
ivf_flat   n < 10M and 4 n d <= 16 GiB       4 d + 8 bytes (IndexIVFFlat, IP)  nprobe of nlist lists; scores exact
ivf_pq     n >= 10M, or larger than that     pq_m + 8 bytes (IndexIVFPQ, IP)   nprobe lists, PQ-approximate scores
=========  ================================  ================================  =====================================

Searches fetch ``rerank`` x k candidates (16 x k for ivf_pq, 2 x k otherwise) and re-score them exactly from the
memory-mapped fp16 features, so every returned score is the exact TracIn score over the stored features; only
recall is approximate (IVF: lists not probed; PQ: candidates the codes rank too low).
Defaults: nlist = the power of two nearest 4 sqrt(n) (at most n / 39), pq_m = the largest of faiss-gpu's
supported code sizes dividing d with >= 16 dims per sub-quantizer (d = 1024 -> 64 bytes, 3072 -> 96),
8 bits per code, nprobe = max(16, nlist / 64); training on a seeded sample of max(64 nlist, 65,536) vectors
(capped at 524,288, but never below faiss's 39 per list). Building streams the features in ``batch_rows``
batches (memory: the training sample, train_size x d x 4 bytes, + one batch + the index itself).

GPU: when ``faiss.get_num_gpus() > 0`` (a faiss-gpu build and a visible GPU), IVF indexes are trained and filled on
GPU 0 and copied back to the CPU to be saved; searches run on all GPUs (the index sharded across them). faiss-cpu
reports 0 GPUs and everything runs on the CPU.

Building shows a progress bar (samples added) on stderr. Indexes are cached in
``<job>/explain/index-<kind>.faiss`` with ``index-<kind>.json`` (parameters and a fingerprint of the feature files);
a cached index is reused only if the fingerprint and parameters match.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import faiss
import numpy as np
from tqdm import tqdm

from pruner.explain.pool import PoolFeatures
from pruner.io.atomic import atomic_path, write_json_atomic
from pruner.io.layout import JobLayout

KINDS = ("flat", "ivf_flat", "ivf_pq")
FLAT_MAX_VECTORS = 1_000_000
FLAT_MAX_BYTES = 4 << 30       # auto: flat only while the fp32 vectors fit in 4 GiB (n <= 350k at d = 3072)
PQ_MIN_VECTORS = 10_000_000
IVF_FLAT_MAX_BYTES = 16 << 30  # auto: ivf_flat only while the fp32 vectors fit in 16 GiB
# candidates fetched per result, re-scored exactly in float64: 2x for the exact kinds (faiss ranks in float32, so
# near-ties at the k-th place could swap), 16x for PQ (benchmarks/results/explain.json: recall@10 0.40 -> 0.96)
RERANK = {"flat": 2, "ivf_flat": 2, "ivf_pq": 16}
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)  # faiss-gpu IVFPQ code sizes (bytes)


def num_gpus() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (detected at run time, never assumed)."""
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def _want_gpu(use_gpu) -> bool:
    return num_gpus() > 0 if use_gpu == "auto" else bool(use_gpu)


@dataclass(frozen=True)
class IndexParams:
    kind: str
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int = 8
    nprobe: int = 1
    train_size: int = 0
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def default_nlist(n: int) -> int:
    nlist = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    return int(max(1, min(nlist, n // 39)))


def default_pq_m(d: int) -> int:
    fits = [m for m in GPU_PQ_M if d % m == 0 and d // m >= 16]
    if fits:
        return max(fits)
    return max(m for m in range(1, d + 1) if d % m == 0 and d // m >= 4) if d >= 4 else 1


def choose_params(n: int, d: int, kind: str = "auto", nlist: Optional[int] = None, pq_m: Optional[int] = None,
                  pq_nbits: int = 8, nprobe: Optional[int] = None, train_size: Optional[int] = None,
                  seed: int = 0) -> IndexParams:
    """The index parameters for n vectors of dimension d (module docstring for the defaults)."""
    if kind == "auto":
        fp32 = 4 * n * d
        kind = ("flat" if n < FLAT_MAX_VECTORS and fp32 <= FLAT_MAX_BYTES else
                "ivf_flat" if n < PQ_MIN_VECTORS and fp32 <= IVF_FLAT_MAX_BYTES else "ivf_pq")
    if kind not in KINDS:
        raise ValueError(f"index kind {kind!r}: one of auto, {', '.join(KINDS)}")
    if kind == "flat":
        return IndexParams("flat", pq_nbits=0, seed=seed)
    nlist = int(nlist or default_nlist(n))
    if nlist > n:
        raise ValueError(f"nlist {nlist} exceeds the {n} vectors")
    pq_m = int(pq_m or default_pq_m(d)) if kind == "ivf_pq" else 0
    if kind == "ivf_pq" and d % pq_m:
        raise ValueError(f"pq_m {pq_m} must divide the dimension {d}")
    train = int(train_size or max(39 * nlist, min(max(64 * nlist, 65536), 524288)))
    return IndexParams(kind, nlist=nlist, pq_m=pq_m, pq_nbits=pq_nbits if kind == "ivf_pq" else 0,
                       nprobe=int(nprobe or min(nlist, max(16, nlist // 64))), train_size=min(train, n), seed=seed)


def new_index(d: int, p: IndexParams) -> faiss.Index:
    """An empty (untrained for IVF) inner-product index."""
    if p.kind == "flat":
        return faiss.IndexFlatIP(d)
    quantizer = faiss.IndexFlatIP(d)
    if p.kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, d, p.nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, p.nlist, p.pq_m, p.pq_nbits, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.nprobe = p.nprobe
    return index


def train_sample_ids(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded, sorted sample of ``size`` distinct ids in [0, n)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def fill_index(index: faiss.Index, p: IndexParams, train, batches, use_gpu="auto",
               timings: Optional[dict] = None) -> faiss.Index:
    """Train ``index`` on ``train()`` (a callable returning float32 [t, d]; only called for IVF kinds) and add the
    float32 batches of ``batches`` (ids 0, 1, ... in order). On a GPU (see module doc) the work runs on GPU 0 and
    the result is copied back to the CPU. Returns the CPU index."""
    gpu = _want_gpu(use_gpu) and p.kind != "flat"
    if gpu:
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True
        work = faiss.index_cpu_to_gpu(res, 0, index, co)
    else:
        work = index
    timings = {} if timings is None else timings
    t0 = time.time()
    if not work.is_trained:
        x = np.ascontiguousarray(train(), dtype=np.float32)
        work.train(x)
        del x
    timings["train_seconds"] = time.time() - t0
    t0 = time.time()
    for x in batches:
        work.add(np.ascontiguousarray(x, dtype=np.float32))
    timings["add_seconds"] = time.time() - t0  # includes reading the memory-mapped features
    out = faiss.index_gpu_to_cpu(work) if gpu else work
    if p.kind != "flat":
        faiss.extract_index_ivf(out).nprobe = p.nprobe
    return out


def to_search_device(index: faiss.Index, use_gpu="auto") -> faiss.Index:
    """The index itself on the CPU, or a copy sharded across all GPUs."""
    if not _want_gpu(use_gpu):
        return index
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True
    co.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(index, co=co)


class PoolIndex:
    """A faiss index over a job's features plus exact re-scoring. Build or load with :meth:`open`."""

    def __init__(self, pool: PoolFeatures, index: faiss.Index, params: IndexParams, meta: dict, use_gpu="auto"):
        self.pool, self.index, self.params, self.meta = pool, index, params, meta
        self._search_index = to_search_device(index, use_gpu)

    @staticmethod
    def paths(job_dir: str | Path, kind: str) -> tuple[Path, Path]:
        return JobLayout(Path(job_dir)).index_files(kind)

    @classmethod
    def open(cls, job_dir: str | Path, kind: str = "auto", *, rebuild: bool = False, save: bool = True,
             batch_rows: int = 65536, use_gpu="auto", pool: Optional[PoolFeatures] = None, **params) -> "PoolIndex":
        """Load the cached index of ``kind`` if it matches the job's features and ``params`` (nlist, pq_m, pq_nbits,
        nprobe, train_size, seed: None = default), else build it (and save it with ``save``)."""
        pool = pool or PoolFeatures.open(job_dir)
        p = choose_params(pool.n, pool.dim, kind, **{k: v for k, v in params.items() if v is not None})
        index_path, meta_path = cls.paths(job_dir, p.kind)
        fp = pool.fingerprint()
        if not rebuild and index_path.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            same = {**p.as_dict(), "nprobe": meta.get("params", {}).get("nprobe")}  # nprobe is search-time only
            if meta.get("fingerprint") == fp and meta.get("params") == same:
                index = faiss.read_index(str(index_path))
                if p.kind != "flat":
                    faiss.extract_index_ivf(index).nprobe = p.nprobe
                meta["params"]["nprobe"] = p.nprobe
                return cls(pool, index, p, {**meta, "loaded": True}, use_gpu)
        t0, timings = time.time(), {}
        bar = tqdm(total=pool.n, desc=f"faiss {p.kind} index", unit="sample", dynamic_ncols=True)

        def batches():  # one shard's features at a time (at most batch_rows rows)
            for _, x in pool.batches(batch_rows):
                yield x
                bar.update(len(x))
        with bar:
            index = fill_index(new_index(pool.dim, p), p,
                               lambda: pool.gather(train_sample_ids(pool.n, p.train_size, p.seed)), batches(),
                               use_gpu, timings)
        meta = {"params": p.as_dict(), "fingerprint": fp, "n": pool.n, "dim": pool.dim, "etas": pool.etas,
                "build_seconds": time.time() - t0, **timings, "faiss": faiss.__version__, "gpus": num_gpus()}
        if save:
            with atomic_path(index_path) as tmp:
                faiss.write_index(index, str(tmp))
            write_json_atomic(meta_path, meta)
        return cls(pool, index, p, {**meta, "loaded": False}, use_gpu)

    def search(self, queries: np.ndarray, k: int, rerank: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products per query: (scores float64 [q, k], ids int64 [q, k]), best first; ties by id.

        ``queries`` float32 [q, d] in the "tracin" view. The index returns ``rerank * k`` candidates (default
        :data:`RERANK`), re-scored exactly (float64) from the stored features. Fewer than k hits pad with id -1,
        score NaN.
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.pool.dim:
            raise ValueError(f"query dimension {q.shape[1]} != index dimension {self.pool.dim}")
        k = int(min(k, self.pool.n))
        rerank = RERANK[self.params.kind] if rerank is None else rerank
        fetch = min(self.pool.n, max(k, rerank * k))
        _, cand = self._search_index.search(q, fetch)
        return self.rescore(q, cand, k)

    def rescore(self, q: np.ndarray, cand: np.ndarray, k: int, max_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Exact float64 inner products of queries [q, d] with candidate ids [q, c] (-1 = none), top k kept.
        Candidates are read for groups of queries of at most ``max_rows`` candidates (bounded memory)."""
        scores = np.full((len(q), k), np.nan)
        ids = np.full((len(q), k), -1, np.int64)
        step = max(1, max_rows // max(1, cand.shape[1]))
        for a in range(0, len(q), step):
            block = cand[a:a + step]
            uniq = np.unique(block[block >= 0])
            vecs = self.pool.gather(uniq)
            for j in range(len(block)):
                c = np.unique(block[j][block[j] >= 0])
                s = vecs[np.searchsorted(uniq, c)].astype(np.float64) @ q[a + j].astype(np.float64)
                order = np.lexsort((c, -s))[:k]
                scores[a + j, :len(order)], ids[a + j, :len(order)] = s[order], c[order]
        return scores, ids
