"""Samples that share a uid across the score files of a pool (merged lakes: two shards whose json carries the same
``uid``), found in memory bounded independently of the pool size.

Rule: the first occurrence in the order the files are given (the reduce step gives the pool's shards in sorted
order, and rows in shard order) is the sample; every later one is a duplicate, excluded from ranking, selection
and counts, and reported as a reject ``duplicate_uid`` naming both locations. Within one shard a repeated *key* is
already rejected by the reader (``duplicate_key``); a repeated uid under two keys of one shard is a duplicate here.

Method: every uid is hashed to 64 bits (blake2b) and its (hash, file, row) entry is appended to one of ``B`` bucket
files by the hash's top bits, B chosen so that one bucket holds at most ``bucket_rows`` entries (16 bytes each); then
each bucket is sorted alone and runs of equal hashes are the candidates, whose uid strings are read back to rule out
hash collisions. Memory: one score file's uid column + one bucket (default 2**22 entries, 64 MiB) + the
candidates. A pool with no duplicate (the usual case) costs one pass over the uid columns and one over the buckets.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_ENTRY = np.dtype([("hash", "<u8"), ("file", "<u4"), ("row", "<u4")])


@dataclass(frozen=True)
class Duplicates:
    """The rows to exclude, per score file (sorted int64 row numbers), and one record per excluded row."""

    rows: dict[Path, np.ndarray]
    records: list[dict]  # uid, url, key (the duplicate) and kept_url, kept_key (the first occurrence)

    def __len__(self) -> int:
        return len(self.records)

    def mask(self, files: Sequence[str | Path]) -> np.ndarray:
        """bool [rows of ``files``]: True at the excluded rows of the files' rows concatenated in the given order."""
        files = [Path(f) for f in files]
        sizes = [pq.read_metadata(f).num_rows for f in files]
        out = np.zeros(int(sum(sizes)), bool)
        off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        for i, f in enumerate(files):
            if f in self.rows:
                out[off[i] + self.rows[f]] = True
        return out


def _hashes(uids: pa.Array) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little")
                     for u in uids.to_pylist()], np.uint64)


def find_duplicate_uids(files: Sequence[str | Path], *, bucket_rows: int = 1 << 22) -> Duplicates:
    """The duplicate samples among the ``files`` (score files with ``uid``, ``key`` and ``shard_url`` columns), by
    the rule of the module docstring. Temporary bucket files live in a folder beside the first file."""
    files = [Path(f) for f in files]
    sizes = [pq.read_metadata(f).num_rows for f in files]
    if sum(sizes) < 2:
        return Duplicates({}, [])
    n_buckets = 1 << max(0, int(np.ceil(np.log2(max(1, sum(sizes)) / bucket_rows))))
    shift = np.uint64(64 - int(np.log2(n_buckets))) if n_buckets > 1 else None
    tmp = Path(tempfile.mkdtemp(prefix=".duplicates-", dir=files[0].parent))
    try:
        handles = [open(tmp / f"b{b:05d}", "wb") for b in range(n_buckets)]
        try:
            for i, f in enumerate(files):
                if not sizes[i]:
                    continue
                e = np.empty(sizes[i], _ENTRY)
                e["hash"] = _hashes(pq.read_table(f, columns=["uid"])["uid"].combine_chunks())
                e["file"], e["row"] = i, np.arange(sizes[i], dtype=np.uint32)
                bucket = (e["hash"] >> shift).astype(np.int64) if shift is not None else np.zeros(len(e), np.int64)
                for b in np.unique(bucket):
                    handles[b].write(e[bucket == b].tobytes())
        finally:
            for h in handles:
                h.close()
        candidates = []  # (file, row) of every entry whose hash occurs more than once
        for b in range(n_buckets):
            e = np.fromfile(tmp / f"b{b:05d}", _ENTRY)
            if len(e) < 2:
                continue
            e.sort(order=["hash", "file", "row"])
            same = e["hash"][1:] == e["hash"][:-1]
            hit = np.zeros(len(e), bool)
            hit[1:] |= same
            hit[:-1] |= same
            candidates.append(e[hit][["file", "row"]])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not candidates:
        return Duplicates({}, [])
    cand = np.concatenate(candidates)
    cand.sort(order=["file", "row"])
    first: dict[str, tuple[str, str]] = {}
    rows: dict[Path, list[int]] = {}
    records = []
    for i in np.unique(cand["file"]).tolist():
        wanted = cand["row"][cand["file"] == i].astype(np.int64)
        t = pq.read_table(files[i], columns=["uid", "key", "shard_url"]).take(pa.array(wanted))
        for row, uid, key, url in zip(wanted.tolist(), *(t[c].to_pylist() for c in ("uid", "key", "shard_url"))):
            if uid not in first:
                first[uid] = (url, key)
                continue
            kept_url, kept_key = first[uid]
            rows.setdefault(files[i], []).append(row)
            records.append({"uid": uid, "url": url, "key": key, "kept_url": kept_url, "kept_key": kept_key})
    return Duplicates({f: np.array(r, np.int64) for f, r in rows.items()}, records)


def without_rows(src: Path, rows: np.ndarray, dst: Path) -> Path:
    """A copy of the score file ``src`` at ``dst`` without ``rows`` (its schema metadata kept)."""
    t = pq.read_table(src)
    keep = np.ones(t.num_rows, bool)
    keep[rows] = False
    pq.write_table(t.filter(pa.array(keep)), dst)
    return dst
