"""Exact global ranking of the pool from the per-shard score files, in memory bounded independently of the pool size.

Order: samples are ranked by (score descending, uid ascending); rank 0 is the best. uids compare as UTF-8 bytes
(= Python ``str`` order). NaN scores are never kept and rank after every number (among themselves by uid);
``-0.0`` ties with ``0.0``. Scores are mapped to :func:`order_key`, a uint64 whose ascending order is this ranking.

:func:`select` finds the exact cut-off by radix selection ("histogram refinement"): each pass over the files
histograms the next 16-bit digit of the order key among the samples still tied with the cut-off on the digits
fixed so far (4 digits fix the score), then digits of the uid (2 bytes per pass) when a group tied on the exact
score is still large; as soon as the candidate bin holds <= ``max_candidates`` samples, one more pass collects
them (score and uid columns) and sorts them in memory. Typical data needs 2-3 passes, reading only the score
column except in the last one. Memory: one score file's score (+ uid) columns (pyarrow reads a file's columns
ahead) + a 66049-bin histogram + ``max_candidates`` (score, uid) pairs (~60 MB at the default 2**20, 32-char uids).

:func:`write_ranking` is an external merge sort: each shard file is sorted alone (in memory: one shard) into a
temporary run file, then the runs are merged in streaming batches (batched k-way merge: every round emits all
buffered rows <= the smallest "last buffered key" of any run, sorted). More than ``fan_in`` runs are first merged
in groups into intermediate runs (one extra read+write of the data per level: 1 level up to fan_in**2 = 4096
shards). Cost: O(N log N) CPU; I/O = read input + write runs + levels x (read + write) + read runs + write output.
Memory: the largest shard file (read + sorted copy) + the merge buffers (one run row group of
``buffer_rows // fan_in`` rows per run, <= ``buffer_rows`` rows) + one round's sorted copy (<= ``buffer_rows``
rows) + one output row group (``row_group`` rows); none of it grows with the number of samples or shards.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pruner.io.atomic import atomic_path

NAN_KEY = np.uint64(2**64 - 1)  # order key of NaN: after every number (no number maps to it)
_SIGN = np.uint64(1 << 63)
_UID_BINS = 257 * 257  # two uid bytes per pass; code 0 = "string ended", byte b -> b + 1
_KEY = "__order_key"
_KEPT = "__kept"  # a keep mask carried through write_ranking's sort


def order_key(scores) -> np.ndarray:
    """uint64 [n] whose ascending order is score descending: an order-preserving map of the float64 bits,
    inverted; ``-0.0`` maps like ``0.0``, NaN to :data:`NAN_KEY` (last)."""
    s = np.asarray(scores, dtype=np.float64) + 0.0  # + 0.0 turns -0.0 into 0.0
    bits = s.view(np.uint64)
    key = ~np.where(bits & _SIGN, ~bits, bits | _SIGN)
    key[np.isnan(s)] = NAN_KEY
    return key


@dataclass(frozen=True)
class Selection:
    """The keep set: a sample is kept iff ``score > cutoff_score``, or ``score == cutoff_score`` and
    (``cutoff_uid is None`` or ``uid <= cutoff_uid``). For top-k selections (cutoff_score, cutoff_uid) is the last
    kept sample; for a threshold, ``cutoff_score`` is the threshold and ``cutoff_uid`` None. Nothing is kept when
    ``n_keep == 0`` (then ``cutoff_score`` is NaN). JSON round-trip: ``Selection(**s.as_dict())``."""

    score: str                  # score column the selection ranks by
    cutoff_score: float
    cutoff_uid: Optional[str]
    n_total: int                # samples in the pool
    n_keep: int                 # samples kept
    n_nan: int                  # samples with a NaN score (never kept)

    def as_dict(self) -> dict:
        return asdict(self)

    def is_kept(self, score_array, uid_array) -> np.ndarray:
        """bool [n]: which of these samples (scores [n] float, uids [n] str: list, numpy or Arrow) are kept."""
        s = np.asarray(score_array, dtype=np.float64)
        if self.n_keep == 0:
            return np.zeros(len(s), bool)
        kept = s > self.cutoff_score
        tie = s == self.cutoff_score
        if self.cutoff_uid is None or not tie.any():
            return kept | tie
        uids = uid_array if isinstance(uid_array, (pa.Array, pa.ChunkedArray)) else pa.array(uid_array, pa.string())
        return kept | (tie & pc.less_equal(uids, self.cutoff_uid).to_numpy(zero_copy_only=False))


def _check_files(files: list[Path], score: str) -> None:
    """Raise ValueError naming the file if it lacks a string ``uid`` or a floating ``score`` column."""
    if not files:
        raise ValueError("no score files given (fix: point to <job>/shards/*.parquet)")
    for f in files:
        schema = pq.read_schema(f)
        if "uid" not in schema.names or not (pa.types.is_string(schema.field("uid").type)
                                             or pa.types.is_large_string(schema.field("uid").type)):
            raise ValueError(f"{f}: no string column 'uid' (columns: {schema.names})")
        if score not in schema.names or not pa.types.is_floating(schema.field(score).type):
            raise ValueError(f"{f}: no floating-point score column {score!r} (columns: {schema.names})")


def _batches(files: list[Path], columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    for f in files:
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns)


def _uid_code(uids: pa.Array, pos: int) -> np.ndarray:
    """int64 [n]: 1 + the UTF-8 byte at ``pos`` of each uid, 0 past its end (a shorter uid sorts first)."""
    off_type = np.int32 if pa.types.is_string(uids.type) else np.int64
    _, off_buf, data_buf = uids.buffers()
    off = np.frombuffer(off_buf, off_type)[uids.offset: uids.offset + len(uids) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    idx = off[:-1].astype(np.int64) + pos
    inside = idx < off[1:]
    code = np.zeros(len(uids), np.int64)
    code[inside] = data[idx[inside]].astype(np.int64) + 1
    return code


def _digit(key: np.ndarray, uids: Optional[pa.Array], level: int) -> np.ndarray:
    """Radix digit ``level`` of (order key, uid): levels 0-3 are 16-bit chunks of the key, then 2 uid bytes each."""
    if level < 4:
        return ((key >> np.uint64(48 - 16 * level)) & np.uint64(0xFFFF)).astype(np.int64)
    j = 2 * (level - 4)
    return _uid_code(uids, j) * 257 + _uid_code(uids, j + 1)


def _match(key: np.ndarray, uids: Optional[pa.Array], prefix: list[int]) -> np.ndarray:
    """bool [n]: rows whose first ``len(prefix)`` digits (>= 1) equal ``prefix``."""
    n_key = min(len(prefix), 4)
    value = 0
    for d in prefix[:n_key]:
        value = (value << 16) | d
    mask = (key >> np.uint64(64 - 16 * n_key)) == np.uint64(value)
    for level in range(4, len(prefix)):
        mask &= _digit(key, uids, level) == prefix[level]
    return mask


def _keep_size(n_total: int, n_valid: int, keep_fraction, keep_count) -> int:
    """floor(keep_fraction * n_total) with the fraction taken as written in decimal (0.29 -> 29/100), or
    keep_count; never more than the non-NaN samples."""
    k = int(Fraction(str(keep_fraction)) * n_total) if keep_fraction is not None else int(keep_count)
    return min(max(k, 0), n_valid)


def select(shard_files: Iterable[str | Path], score: str, keep_fraction: Optional[float] = None,
           keep_count: Optional[int] = None, threshold: Optional[float] = None, *,
           max_candidates: int = 1 << 20, batch_rows: int = 1 << 16) -> Selection:
    """The exact keep set over all ``shard_files`` for column ``score`` (give exactly one of the three criteria).

    keep_fraction: keep floor(fraction x n_total) samples (n_total counts NaN-scored samples too);
    keep_count: keep that many; threshold: keep every sample with ``score >= threshold``. Top-k criteria keep the
    best by (score desc, uid asc) and never more than the non-NaN samples. The result does not depend on the
    order of the files or on how the samples are split between them. Memory: see the module docstring.
    Raises ValueError for a missing/non-float column, no files, or duplicate uids at the cut-off.
    """
    if sum(x is not None for x in (keep_fraction, keep_count, threshold)) != 1:
        raise ValueError("give exactly one of keep_fraction, keep_count, threshold")
    if max_candidates < 1:
        raise ValueError("max_candidates must be >= 1")
    files = [Path(f) for f in shard_files]
    _check_files(files, score)

    n_total = n_nan = n_at_least = 0
    hist = np.zeros(1 << 16, np.int64)
    for b in _batches(files, [score], batch_rows):
        s = b.column(0).to_numpy(zero_copy_only=False)
        key = order_key(s)
        valid = key != NAN_KEY
        n_total += len(s)
        n_nan += int(len(s) - valid.sum())
        if threshold is not None:
            n_at_least += int(np.count_nonzero(s[valid] >= threshold))
        else:
            hist += np.bincount(_digit(key[valid], None, 0), minlength=1 << 16)
    if threshold is not None:
        return Selection(score, float(threshold), None, n_total, n_at_least, n_nan)
    k = _keep_size(n_total, n_total - n_nan, keep_fraction, keep_count)
    if k == 0:
        return Selection(score, math.nan, None, n_total, 0, n_nan)

    prefix: list[int] = []
    target = k - 1  # index of the last kept sample among the candidates, in ranking order
    while True:
        cum = np.cumsum(hist)
        d = int(np.searchsorted(cum, target, side="right"))
        target -= int(cum[d - 1]) if d else 0
        prefix.append(d)
        if hist[d] <= max_candidates:
            break
        if len(prefix) > 4 and d == 0:  # candidates agree on score and on the whole uid
            raise ValueError(f"{hist[d]} samples share the uid and score at the cut-off: uids must be unique")
        level = len(prefix)
        hist = np.zeros(1 << 16 if level < 4 else _UID_BINS, np.int64)
        for b in _batches(files, [score] if level < 4 else [score, "uid"], batch_rows):
            key = order_key(b.column(0).to_numpy(zero_copy_only=False))
            uids = b.column(1) if level >= 4 else None
            m = _match(key, uids, prefix) & (key != NAN_KEY)
            hist += np.bincount(_digit(key[m], uids.filter(pa.array(m)) if level >= 4 else None, level),
                                minlength=len(hist))

    parts = []
    for b in _batches(files, [score, "uid"], batch_rows):
        key, uids = order_key(b.column(0).to_numpy(zero_copy_only=False)), b.column(1)
        m = pa.array(_match(key, uids, prefix) & (key != NAN_KEY))
        parts.append(pa.table({_KEY: pa.array(key).filter(m), "score": b.column(0).filter(m),
                               "uid": uids.filter(m)}))
    cand = pa.concat_tables(parts).sort_by([(_KEY, "ascending"), ("uid", "ascending")])
    return Selection(score, float(cand["score"][target].as_py()), cand["uid"][target].as_py(), n_total, k, n_nan)


def _sorted(table: pa.Table, score: str) -> pa.Table:
    """``table`` in ranking order."""
    keyed = table.append_column(_KEY, pa.array(order_key(table[score].to_numpy())))
    return keyed.sort_by([(_KEY, "ascending"), ("uid", "ascending")]).drop_columns([_KEY])


def _write_run(tables: Iterable[pa.Table], schema: pa.Schema, path: Path, row_group: int) -> Path:
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="none") as w:
        for t in tables:
            w.write_table(t, row_group_size=row_group)
    return path


def _count_upto(key: np.ndarray, uids: pa.Array, bound: tuple[int, str]) -> int:
    """How many leading rows of a batch sorted in ranking order are <= ``bound`` = (order key, uid)."""
    lo, hi = (int(np.searchsorted(key, np.uint64(bound[0]), side=s)) for s in ("left", "right"))
    if hi == lo:
        return lo
    return lo + int(pc.sum(pc.less_equal(uids.slice(lo, hi - lo), bound[1])).as_py())


def _row_groups(path: Path) -> Iterator[pa.RecordBatch]:
    """The non-empty batches of a Parquet file, read one row group at a time (``iter_batches`` would pre-buffer the
    whole file)."""
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        yield from (b for b in pf.read_row_group(i).combine_chunks().to_batches() if len(b))


def _merge(runs: list[Path], score: str) -> Iterator[pa.Table]:
    """Tables whose concatenation is all rows of the sorted ``runs`` in ranking order (batched k-way merge
    holding one row group per run)."""
    live = []  # [row group iterator, buffered rows, their order keys]
    for r in runs:
        it = _row_groups(r)
        b = next(it, None)
        if b is not None:
            live.append([it, b, order_key(b.column(score).to_numpy(zero_copy_only=False))])
    while live:
        bound = min((int(k[-1]), b.column("uid")[-1].as_py()) for _, b, k in live)
        parts, still = [], []
        for item in live:
            it, b, k = item
            n = _count_upto(k, b.column("uid"), bound)
            parts.append(b.slice(0, n))
            if n < len(k):
                item[1:] = [b.slice(n), k[n:]]
            else:
                b = next(it, None)
                if b is None:
                    continue
                item[1:] = [b, order_key(b.column(score).to_numpy(zero_copy_only=False))]
            still.append(item)
        live = still
        yield _sorted(pa.Table.from_batches(parts), score)


def _rechunk(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The same rows in tables of ``rows`` rows (the last one shorter)."""
    buf, n = [], 0
    for t in tables:
        buf.append(t)
        n += len(t)
        while n >= rows:
            whole = pa.concat_tables(buf)
            yield whole.slice(0, rows)
            buf, n = [whole.slice(rows)], n - rows
    if n:
        yield pa.concat_tables(buf)


def write_ranking(shard_files: Iterable[str | Path], score: str, out_path: str | Path,
                  selection: Selection | np.ndarray, *, buffer_rows: int = 1 << 18, fan_in: int = 64,
                  row_group: int = 1 << 16, metadata: dict[str, str] | None = None) -> Path:
    """Write ``out_path``: ONE Parquet table of every sample (all columns of the score files, in the first file's
    column order) plus ``rank`` (int64, 0 = best by score desc then uid asc) and ``kept`` (bool), rows in rank order,
    in row groups of ``row_group`` rows. All files must have the same columns. ``selection`` is the keep set: a
    :class:`Selection` (``kept`` = ``rank < selection.n_keep``), or a bool mask [n] over the files' rows
    concatenated in the given order (a selection policy's keep set, :mod:`pruner.select.policies`; carried through
    the sort as a hidden column; 1 byte per sample held). Temporary runs live in a hidden folder beside
    ``out_path`` (about the size of the data) and are removed afterwards. The schema metadata records
    ``pruner.ranked_by`` (``score``) and ``metadata``. Raises ValueError if ``kept`` disagrees with ``selection.is_kept`` (duplicate
    uids, or a selection computed on other files) or the row count differs from the selection's (or mask's).
    """
    mask = None if isinstance(selection, Selection) else np.asarray(selection, bool)
    n_total = selection.n_total if mask is None else len(mask)
    files = [Path(f) for f in shard_files]
    _check_files(files, score)
    if mask is not None:
        rows = sum(pq.read_metadata(f).num_rows for f in files)
        if len(mask) != rows:
            raise ValueError(f"the keep mask has {len(mask)} entries, the files {rows} rows")
    schema = pq.read_schema(files[0]).remove_metadata()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.runs-", dir=out_path.parent))
    run_rows = max(256, buffer_rows // fan_in)
    try:
        runs, off = [], 0
        run_schema = schema if mask is None else schema.append(pa.field(_KEPT, pa.bool_()))
        for i, f in enumerate(files):
            t = pq.read_table(f)
            if set(t.column_names) != set(schema.names):
                raise ValueError(f"{f}: columns {t.column_names} differ from {files[0]}'s {schema.names}")
            t = t.select(schema.names).cast(schema)
            if mask is not None:
                t = t.append_column(_KEPT, pa.array(mask[off:off + len(t)]))
            off += len(t)
            runs.append(_write_run([_sorted(t, score)], run_schema, tmp_dir / f"run-{i:06d}.parquet", run_rows))
        level = 0
        while len(runs) > fan_in:
            groups = [runs[i: i + fan_in] for i in range(0, len(runs), fan_in)]
            runs = [_write_run(_rechunk(_merge(g, score), run_rows), run_schema,
                               tmp_dir / f"merge{level}-{i:06d}.parquet", run_rows) for i, g in enumerate(groups)]
            for g in groups:
                for r in g:
                    r.unlink()
            level += 1
        out_schema = schema.append(pa.field("rank", pa.int64())).append(pa.field("kept", pa.bool_())).with_metadata(
            {"pruner.ranked_by": score, **(metadata or {})})
        n = 0
        with atomic_path(out_path) as tmp, pq.ParquetWriter(tmp, out_schema) as w:
            for t in _rechunk(_merge(runs, score), row_group):
                rank = np.arange(n, n + len(t), dtype=np.int64)
                if mask is not None:
                    kept = t[_KEPT].to_numpy()
                    t = t.drop_columns([_KEPT])
                else:
                    kept = rank < selection.n_keep
                    if not np.array_equal(kept, selection.is_kept(t[score].to_numpy(), t["uid"])):
                        raise ValueError(f"ranks {n}..{n + len(t) - 1}: kept set disagrees with the selection "
                                         f"(duplicate uids, or a selection computed on other files)")
                w.write_table(t.append_column("rank", pa.array(rank)).append_column("kept", pa.array(kept)),
                              row_group_size=row_group)
                n += len(t)
            if n != n_total:
                raise ValueError(f"ranked {n} samples but the selection counted {n_total}")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_path
