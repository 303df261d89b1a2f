"""Selection policies beyond the global top-k: balanced keeps per gradient cluster or class, and near-duplicate removal.

Every policy ranks samples as :mod:`pruner.select.rank` does (score descending, then uid ascending; NaN scores are
never kept) and keeps ``K = floor(keep_fraction x n_total)`` (or ``keep_count``) samples in all, so policies are
comparable at equal budget:

* ``top_k``: the K best samples of the pool (with ``dedup_threshold``: the K best after near-duplicate removal).
* ``cluster_balanced``: every gradient cluster (``clusters.parquet`` of :mod:`pruner.explain.cluster`, computed on
  demand) keeps the same fraction K / n_total of its samples, its best ones by the score. Quotas are exact integers
  by the largest-remainder method (quota_g = floor(K n_g / n) plus one for the largest remainders K n_g mod n,
  ties to the smaller group id), capped by the group's non-NaN samples, any shortfall redistributed the same way.
* ``class_balanced``: the same with groups = the class label ``json[label_key]`` of each sample (samples without
  one form their own group, reported as ``null``).
* Near-duplicate removal (``dedup_threshold`` = a cosine in (0, 1]): walking each group in ranking order, a
  sample whose cosine to an already retained, better-ranked sample of the same group exceeds the threshold is
  dropped before quotas are filled (the budget is then filled from the next-ranked samples). Space ``gradient``:
  the unit TracIn embedding (:mod:`pruner.explain.pool`, "unit" view, the one clustered); space ``embedding``:
  the CLIP image+text embedding at the last checkpoint (:func:`pruner.explain.query.pool_embeddings`, one
  forward pass over the pool, cached in ``<job>/explain/embeddings/``). Groups are the clusters / classes
  (near-duplicates share both), or the whole pool for top_k (search stops once K samples are retained).

Memory: the balanced policies hold per-sample (uid, group, score, order key, id) columns: ~40 bytes + the uid
length, i.e. ~70 bytes per sample with 32-character uids (0.7 GB for 10M samples) plus Arrow's sort indices
(8 bytes per sample). Dedup also holds the retained vectors of the current group in a flat index (4 m k bytes per
retained sample) and costs O(retained x candidates x m k) inner products per group.

Output: the keep set in the formats of :func:`pruner.io.manifests.write_manifests` (through a small adapter that
expresses an arbitrary keep set as a threshold Selection over temporary one-column score files), plus
``policy.json`` (parameters and per-group counts) in the same folder.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pruner.io.atomic import write_json_atomic
from pruner.io.layout import JobLayout
from pruner.io.manifests import write_manifests
from pruner.jobfiles import JobFiles
from pruner.select.rank import NAN_KEY, Selection, _keep_size, _check_files, order_key

POLICIES = ("top_k", "cluster_balanced", "class_balanced")
DEDUP_SPACES = ("gradient", "embedding")
KEEP_COLUMN = "__policy_keep"
NULL_GROUP = -1


# -- quotas and per-group top-k ------------------------------------------------------------------------------

def balanced_quotas(sizes: Sequence[int], valid: Sequence[int], n_keep: int) -> np.ndarray:
    """int64 quotas per group summing to ``n_keep``: proportional to ``sizes`` by the largest-remainder method,
    capped by ``valid`` (non-NaN samples), shortfall redistributed. Raises if ``n_keep > sum(valid)``."""
    sizes = np.asarray(sizes, np.int64)
    valid = np.asarray(valid, np.int64)
    total = int(sizes.sum())
    if n_keep > int(valid.sum()):
        raise ValueError(f"cannot keep {n_keep} of {int(valid.sum())} samples with a score")
    if total == 0 or n_keep == 0:
        return np.zeros(len(sizes), np.int64)
    exact = [n_keep * int(s) for s in sizes]  # quota_g = exact_g / total, in integers
    quota = np.array([e // total for e in exact], np.int64)
    remainder = np.array([e % total for e in exact], np.int64)
    quota = np.minimum(quota, valid)
    left = n_keep - int(quota.sum())
    # first round: largest remainders (ties: smaller group); later rounds: any group with room, by remainder
    while left > 0:
        room = np.flatnonzero(quota < valid)
        order = room[np.lexsort((room, -remainder[room]))]
        take = order[:left]
        quota[take] += 1
        left -= len(take)
        remainder[:] = 0
    return quota


def group_top(groups: np.ndarray, keys: np.ndarray, uids: pa.Array, quotas: dict[int, int],
              eligible: Optional[np.ndarray] = None) -> np.ndarray:
    """bool [n]: per group g, its ``quotas[g]`` best eligible samples by (order key asc, uid asc)."""
    n = len(groups)
    ok = np.ones(n, bool) if eligible is None else eligible.copy()
    ok &= keys != NAN_KEY
    t = pa.table({"g": pa.array(groups), "k": pa.array(keys), "uid": uids, "id": pa.array(np.arange(n))})
    t = t.filter(pa.array(ok)).sort_by([("g", "ascending"), ("k", "ascending"), ("uid", "ascending")])
    g = t["g"].to_numpy()
    ids = t["id"].to_numpy()
    starts = np.searchsorted(g, np.array(sorted(quotas)), side="left")
    keep = np.zeros(n, bool)
    for grp, s in zip(sorted(quotas), starts):
        q = quotas[grp]
        if q:
            chunk = ids[s:s + q]
            if len(chunk) < q or (g[s:s + q] != grp).any():
                raise ValueError(f"group {grp}: fewer than {q} eligible samples")
            keep[chunk] = True
    return keep


def rank_order(keys: np.ndarray, uids: pa.Array, ids: Optional[np.ndarray] = None) -> np.ndarray:
    """Sample ids (all, or ``ids``) in ranking order: order key ascending, then uid ascending."""
    ids = np.arange(len(keys)) if ids is None else np.asarray(ids)
    t = pa.table({"k": pa.array(keys[ids]), "uid": uids.take(pa.array(ids)), "id": pa.array(ids)})
    return t.sort_by([("k", "ascending"), ("uid", "ascending")])["id"].to_numpy()


# -- near-duplicates -------------------------------------------------------------------------------------------

def greedy_dedup(vectors, order: np.ndarray, threshold: float, stop_after: Optional[int] = None,
                 batch: int = 2048, stats: Optional[dict] = None) -> np.ndarray:
    """Ids of ``order`` (ranking order) retained by greedy near-duplicate removal: a sample is dropped if its cosine
    to a retained, better-ranked sample exceeds ``threshold``. ``vectors(ids)`` returns unit float32 rows. Stops once
    ``stop_after`` samples are retained (the rest are neither retained nor dropped). ``stats`` (a dict) receives
    ``examined`` and ``dropped`` counts."""
    index = None
    retained: list[np.ndarray] = []
    n_ret = 0
    examined = 0
    for s in range(0, len(order), batch):
        chunk = order[s:s + batch]
        x = np.ascontiguousarray(vectors(chunk), dtype=np.float32)
        dup = np.zeros(len(chunk), bool)
        if index is not None and index.ntotal:
            d, _ = index.search(x, 1)
            dup = d[:, 0] > threshold
        gram = x @ x.T
        close = np.triu(gram > threshold, 1)  # close[j, i]: earlier j, later i
        acc = np.zeros(len(chunk), bool)
        contested = close.any(0)
        stop = len(chunk)
        for i in range(len(chunk)):
            if dup[i]:
                continue
            if contested[i] and (close[:i, i] & acc[:i]).any():
                continue
            acc[i] = True
            if stop_after is not None and n_ret + int(acc.sum()) >= stop_after:
                stop = i + 1
                break
        examined += stop
        if acc.any():
            if index is None:
                index = faiss.IndexFlatIP(x.shape[1])
            index.add(x[acc])
            retained.append(chunk[acc])
            n_ret += int(acc.sum())
        if stop_after is not None and n_ret >= stop_after:
            break
    if stats is not None:
        stats.update(examined=examined, dropped=examined - n_ret)
    return np.concatenate(retained) if retained else np.zeros(0, np.int64)


# -- the keep-set adapter for write_manifests ------------------------------------------------------------------

def write_keep_set(score_files: Sequence[Path], keep: np.ndarray, keep_dir: str | Path,
                   pool: Sequence[str] = ()) -> dict:
    """Write an arbitrary keep set (bool [n] over the samples of ``score_files``, sorted, in row order) with
    :func:`write_manifests` (``pool``: shard URLs to list even without a scored sample). Adapter: one temporary
    file per shard holding uid, key, shard_url and a 0/1 column, and the threshold Selection ``column >= 1``.
    Temporary files live beside ``keep_dir`` and are removed afterwards."""
    files = sorted(Path(f) for f in score_files)
    keep_dir = Path(keep_dir)
    keep_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{keep_dir.name}.policy-", dir=keep_dir.parent))
    try:
        off, staged = 0, []
        for f in files:
            t = pq.read_table(f, columns=["uid", "key", "shard_url"])
            flag = keep[off:off + len(t)].astype(np.float64)
            off += len(t)
            p = tmp / f.name
            pq.write_table(t.append_column(KEEP_COLUMN, pa.array(flag)), p)
            staged.append(p)
        if off != len(keep):
            raise ValueError(f"keep mask has {len(keep)} entries, the score files {off} rows")
        n_keep = int(keep.sum())
        sel = Selection(KEEP_COLUMN, 1.0 if n_keep else float("nan"), None, off, n_keep, 0)
        return write_manifests(staged, sel, keep_dir, pool)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- policies on a job directory -------------------------------------------------------------------------------

def _score_columns(files: Sequence[Path], score: str) -> tuple[pa.Array, np.ndarray]:
    """(uid [n] string, order key [n] uint64) over the files, in id order."""
    uids, keys = [], []
    for f in files:
        t = pq.read_table(f, columns=["uid", score])
        uids.extend(t["uid"].chunks)
        keys.append(order_key(t[score].to_numpy(zero_copy_only=False)))
    return pa.concat_arrays(uids) if uids else pa.array([], pa.string()), np.concatenate(keys)


def cluster_groups(job_dir: Path, uids: pa.Array, n_clusters: int, seed: int) -> np.ndarray:
    """int32 [n] cluster of each sample from ``clusters.parquet``, (re)clustering (without reading the shards) when
    it is missing, stale (other samples) or made with other parameters."""
    from pruner.explain.cluster import cluster_pool

    layout = JobLayout(job_dir)
    pq_path, js_path = layout.clusters_table, layout.clusters_summary
    if pq_path.exists() and js_path.exists():
        meta = json.loads(js_path.read_text())
        t = pq.read_table(pq_path, columns=["uid", "cluster"])
        if (meta.get("n_clusters"), meta.get("seed")) == (n_clusters, seed) and len(t) == len(uids) \
                and t["uid"].combine_chunks().equals(uids):
            return t["cluster"].to_numpy()
    # no shard pass here (labels and captions are only for the summary; `pruner cluster` adds them)
    return cluster_pool(job_dir, n_clusters, seed=seed, read_shards=False)["_arrays"]["cluster"]


def class_groups(job_dir: Path, files: Sequence[Path], uids: pa.Array, label_key: str) -> tuple[np.ndarray, list]:
    """(int32 [n] label code, -1 = no label; label names) from ``clusters.parquet`` when it holds this label key
    for these samples, else by reading the shards' json members."""
    from pruner.explain.pool import sample_labels

    layout = JobLayout(job_dir)
    pq_path, js_path = layout.clusters_table, layout.clusters_summary
    labels = None
    if pq_path.exists() and js_path.exists() and json.loads(js_path.read_text()).get("label_key") == label_key:
        t = pq.read_table(pq_path, columns=["uid", "label"])
        if len(t) == len(uids) and t["uid"].combine_chunks().equals(uids):
            labels = t["label"].combine_chunks().dictionary_encode()
    if labels is None:
        labels, _ = sample_labels(files, label_key, pipes=JobFiles(job_dir).trusted_pipes())
    if labels.null_count == len(labels):
        raise ValueError(f"no sample has a json {label_key!r} field: class_balanced needs class labels "
                         f"(fix: set select.label_key, or use cluster_balanced)")
    codes = labels.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    codes[~labels.is_valid().to_numpy(zero_copy_only=False)] = NULL_GROUP
    return codes, labels.dictionary.to_pylist()


def dedup_vectors(root: Path, n: int, space: str):
    """``ids -> unit float32 rows`` in the dedup space: ``gradient`` (the stored features, "unit" TracIn view) or
    ``embedding`` (CLIP image+text embeddings at the last checkpoint, computed and cached on first use by
    :func:`pruner.explain.query.pool_embeddings`)."""
    if space == "gradient":
        from pruner.explain.pool import PoolFeatures
        pool = PoolFeatures.open(root)
        if pool.n != n:
            raise ValueError(f"{root}: {pool.n} feature rows for {n} scored samples")
        return lambda ids: pool.gather(ids, "unit")
    from pruner.explain.query import pool_embeddings
    arrays = [np.load(p, mmap_mode="r") for p in pool_embeddings(root)]
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])])
    if offsets[-1] != n:
        raise ValueError(f"{root}: {offsets[-1]} embedding rows for {n} scored samples")

    def gather(ids):
        ids = np.asarray(ids, np.int64)
        fi = np.searchsorted(offsets, ids, side="right") - 1
        out = np.zeros((len(ids), arrays[0].shape[1]), np.float32)
        for f in np.unique(fi):
            sel = np.flatnonzero(fi == f)
            out[sel] = arrays[f][ids[sel] - offsets[f]]
        nrm = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, nrm, out=np.zeros_like(out), where=nrm > 0)
    return gather


def select_policy(job_dir: str | Path, policy: str = "cluster_balanced", score: str = "diffin_target", *,
                  keep_fraction: Optional[float] = None, keep_count: Optional[int] = None,
                  dedup_threshold: Optional[float] = None, dedup_space: str = "gradient",
                  n_clusters: int = 100, label_key: str = "classname", seed: int = 0,
                  keep_dir: Optional[str | Path] = None, write: bool = True,
                  score_files: Optional[list[Path]] = None, pool: Optional[Sequence[str]] = None,
                  exclude: Optional[np.ndarray] = None, ineligible: Optional[np.ndarray] = None) -> dict:
    """Apply a policy to a finished job (module docstring) and, with ``write``, write its keep set into
    ``keep_dir`` (default ``<job>/keep``) with policy.json. Returns the policy summary (``"keep"``: bool [n] in id
    order, dropped from policy.json). ``score_files``: the job's non-empty score files sorted by name, and
    ``pool``: its shard URLs (all listed in the manifest), when the caller has already listed them (the reduce
    step); by default listed here from ``<job>/shards`` and, for ``pool``, from the job's ``config.yaml``
    (pruner.jobfiles.JobFiles.pool). ``exclude``: bool [n] in id order, samples that are not part of the pool (the
    later copies of a duplicated uid, :mod:`pruner.select.duplicates`): never kept, and not counted in the budget or
    the groups.
    ``ineligible``: bool [n] in id order, samples of the pool that are never kept but count (those set apart by the
    filter stage, :mod:`pruner.select.stages`)."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: one of {POLICIES}")
    if (keep_fraction is None) == (keep_count is None):
        raise ValueError("give exactly one of keep_fraction, keep_count (policies keep a budget, not a threshold)")
    if dedup_threshold is not None and not 0 < dedup_threshold <= 1:
        raise ValueError("dedup_threshold is a cosine in (0, 1]")
    if dedup_space not in DEDUP_SPACES:
        raise ValueError(f"dedup_space {dedup_space!r}: one of {DEDUP_SPACES}")
    root = Path(job_dir)
    files = sorted(score_files) if score_files is not None else \
        [f for f in JobLayout(root).score_files() if pq.read_metadata(f).num_rows > 0]
    _check_files(files, score)
    uids, keys = _score_columns(files, score)
    counted = np.ones(len(keys), bool) if exclude is None else ~np.asarray(exclude, bool)
    if len(counted) != len(keys):
        raise ValueError(f"exclude has {len(counted)} entries, the score files {len(keys)} rows")
    keys = np.where(counted, keys, NAN_KEY)  # an excluded sample is never kept, like a NaN score
    if ineligible is not None:
        keys = np.where(np.asarray(ineligible, bool), NAN_KEY, keys)
    n = int(counted.sum())
    n_valid = int((keys != NAN_KEY).sum())
    k = _keep_size(n, n_valid, keep_fraction, keep_count)

    names = None
    if policy == "cluster_balanced":
        groups = cluster_groups(root, uids, n_clusters, seed)
    elif policy == "class_balanced":
        groups, names = class_groups(root, files, uids, label_key)
    else:
        groups = np.zeros(n, np.int32)

    eligible = None
    dedup_info = None
    if dedup_threshold is not None:
        vectors = dedup_vectors(root, len(keys), dedup_space)  # by id: every row of the score files
        eligible = np.zeros(n, bool)
        examined = dropped = 0
        valid_ids = np.flatnonzero(keys != NAN_KEY)
        by_group = valid_ids[np.argsort(groups[valid_ids], kind="stable")]
        bounds = np.flatnonzero(np.diff(groups[by_group])) + 1
        for members in np.split(by_group, bounds):
            if not len(members):
                continue
            order = rank_order(keys, uids, members)
            st: dict = {}
            kept = greedy_dedup(vectors, order, dedup_threshold, stop_after=k if policy == "top_k" else None,
                                stats=st)
            eligible[kept] = True
            examined, dropped = examined + st["examined"], dropped + st["dropped"]
        # top_k stops once K samples are retained: "examined" is then the ranking prefix that was searched
        dedup_info = {"threshold": dedup_threshold, "space": dedup_space, "removed": dropped,
                      "retained": int(eligible.sum()), "examined": examined}

    gids, sizes = np.unique(groups[counted], return_counts=True)
    valid_mask = keys != NAN_KEY if eligible is None else eligible & (keys != NAN_KEY)
    valid_counts = np.bincount(np.searchsorted(gids, groups[valid_mask]), minlength=len(gids))
    if policy == "top_k":
        if k > int(valid_counts.sum()):
            raise ValueError(f"only {int(valid_counts.sum())} samples remain after dedup for a budget of {k}")
        quotas = np.array([k])
    else:
        quotas = balanced_quotas(sizes, valid_counts, k)
    keep = group_top(groups, keys, uids, dict(zip(gids.tolist(), quotas.tolist())), eligible)
    kept_per = np.bincount(np.searchsorted(gids, groups[keep]), minlength=len(gids))

    def gname(g):
        if names is not None:
            return None if g == NULL_GROUP else names[g]
        return int(g)

    summary = {
        "policy": policy, "score": score, "n_total": n, "n_valid": n_valid, "n_keep": int(keep.sum()),
        "keep_fraction": keep_fraction, "keep_count": keep_count,
        "groups": None if policy == "top_k" else [
            {"group": gname(g), "size": int(s), "eligible": int(v), "kept": int(c)}
            for g, s, v, c in zip(gids.tolist(), sizes, valid_counts, kept_per)],
        "n_clusters": n_clusters if policy == "cluster_balanced" else None,
        "label_key": label_key if policy == "class_balanced" else None,
        "dedup": dedup_info,
    }
    if write:
        keep_dir = Path(keep_dir) if keep_dir is not None else JobLayout(root).keep_dir
        pool = JobFiles(root).pool(scored_only=True) if pool is None else pool
        summary["manifests"] = write_keep_set(files, keep, keep_dir, pool)
        write_json_atomic(keep_dir / "policy.json", summary)
    summary["keep"] = keep
    return summary


def apply_select_config(job_dir: str | Path, cfg, seed: int = 0, keep_dir: Optional[str | Path] = None,
                        score_files: Optional[list[Path]] = None, pool: Optional[Sequence[str]] = None,
                        exclude: Optional[np.ndarray] = None, ineligible: Optional[np.ndarray] = None) -> dict:
    """:func:`select_policy` driven by a :class:`pruner.config.SelectConfig` ``cfg`` (the job's reduce step)."""
    if cfg.threshold is not None:  # the config refuses it with a policy or dedup; plain top-k has no business here
        raise ValueError("select.threshold cannot be combined with a balanced policy or dedup (fix: keep_fraction)")
    return select_policy(job_dir, cfg.policy, cfg.score, keep_fraction=cfg.keep_fraction, keep_count=cfg.keep_count,
                         dedup_threshold=cfg.dedup_threshold, dedup_space=cfg.dedup_space, n_clusters=cfg.n_clusters,
                         label_key=cfg.label_key, seed=seed, keep_dir=keep_dir, score_files=score_files, pool=pool,
                         exclude=exclude, ineligible=ineligible)
