"""A finished job's stored projected gradients, seen as one virtual matrix over the whole pool.

Sample ids: the pool's samples are numbered 0..n-1 in the order of the per-shard score files
(``shards/<id>.parquet``, sorted by name, as :meth:`pruner.io.layout.JobLayout.score_files` lists them), rows in
file order; row j of a score file is row ``row[j]`` of each ``shards/<id>.c<i>.npy`` (fp16 [n_shard, k]).

Two views of a sample z, from the features P g_i(z) at checkpoints i = 0..m-1 with learning-rate weights eta_i
(read from ``shared/ckpt-<i>.pt``, the weights the job's TracIn scores used):

* ``"tracin"``: ``concat_i sqrt(eta_i) P g_i(z)`` [m k]. The inner product of two such vectors is the TracIn
  score ``sum_i eta_i <P g_i(q), P g_i(z)>`` (methods §2.1/2.3: Captum's TracInCPFastRandProj embedding).
* ``"unit"``: ``concat_i sqrt(eta_i) P g_i(z) / ||P g_i(z)||``, then scaled to unit norm (the "cosine TracIn"
  embedding of methods §2.1 for clustering and near-duplicate search; a zero block stays zero).

Everything is read memory-mapped, one shard at a time and at most ``batch_rows`` rows per batch: memory is
``batch_rows x m k x 4`` bytes plus the n-entry offset table, independent of the pool size.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Container, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pruner.io.layout import JobLayout
from pruner.io.shards import open_shard_stream, tar_samples
from pruner.io.store import load_features
from pruner.jobfiles import JobFiles

WEIGHTINGS = ("tracin", "unit")


def weight_blocks(blocks: Sequence[np.ndarray], etas: Sequence[float], weighting: str = "tracin") -> np.ndarray:
    """float32 [b, m k] from per-checkpoint blocks [b, k] (any float dtype), in the given view (module doc)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r}: one of {WEIGHTINGS}")
    parts = []
    for f, eta in zip(blocks, etas):
        f = np.asarray(f, dtype=np.float32)
        if weighting == "unit":
            nrm = np.linalg.norm(f, axis=1, keepdims=True)
            f = np.divide(f, nrm, out=np.zeros_like(f), where=nrm > 0)
        parts.append(f * np.float32(np.sqrt(eta)))
    x = np.concatenate(parts, axis=1)
    if weighting == "unit":
        nrm = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, nrm, out=np.zeros_like(x), where=nrm > 0)
    return x


@dataclass
class PoolFeatures:
    """The stored features of a job (see the module docstring). Open with :meth:`open`."""

    root: Path
    files: list[Path]           # score files with at least one row, sorted by name
    counts: np.ndarray          # [n_files] rows per file
    offsets: np.ndarray         # [n_files + 1] first id of each file, then n
    etas: list[float]           # eta_i per checkpoint
    k: int                      # projected dimension per checkpoint

    @classmethod
    def open(cls, job_dir: str | Path) -> "PoolFeatures":
        """Check the feature files (shapes, dtype, row alignment) and build the id table. Raises
        FileNotFoundError naming a missing file (a job run with ``features.save: false`` has none)."""
        root = Path(job_dir)
        etas = JobFiles(root).etas()
        files, counts, k = [], [], None
        for f in JobLayout(root).score_files():
            n = pq.read_metadata(f).num_rows
            if n == 0:
                continue
            rows = pq.read_table(f, columns=["row"])["row"].to_numpy()
            if not np.array_equal(rows, np.arange(n)):
                raise ValueError(f"{f}: column 'row' is not 0..{n - 1}; the feature files are not row-aligned")
            for i in range(len(etas)):
                p = feature_path(f, i)
                if not p.exists():
                    raise FileNotFoundError(f"{p} does not exist (fix: re-run the job with features.save: true)")
                a = load_features(p)
                if a.ndim != 2 or a.shape[0] != n or (k is not None and a.shape[1] != k):
                    raise ValueError(f"{p}: shape {a.shape}, expected [{n}, {k or 'k'}] (row-aligned with {f.name})")
                k = a.shape[1]
            files.append(f)
            counts.append(n)
        if not files:
            raise ValueError(f"{root}/shards holds no scored samples")
        counts = np.asarray(counts, np.int64)
        return cls(root, files, counts, np.concatenate([[0], np.cumsum(counts)]), etas, int(k))

    # -- shape ----------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    @property
    def m(self) -> int:
        return len(self.etas)

    @property
    def dim(self) -> int:
        return self.m * self.k

    def fingerprint(self) -> dict:
        """What an index built from these features depends on (file names, sizes, mtimes; etas)."""
        files = []
        for f in self.files:
            for p in [f] + [feature_path(f, i) for i in range(self.m)]:
                st = p.stat()
                files.append([p.name, st.st_size, st.st_mtime_ns])
        return {"files": files, "etas": self.etas, "k": self.k, "n": self.n}

    # -- reading --------------------------------------------------------------------------------------------
    def blocks(self, file_index: int, start: int = 0, stop: Optional[int] = None) -> list[np.ndarray]:
        """Per-checkpoint fp16 rows [start, stop) of one file (memory-mapped views)."""
        return [load_features(feature_path(self.files[file_index], i))[start:stop] for i in range(self.m)]

    def batches(self, batch_rows: int = 65536, weighting: str = "tracin") -> Iterator[tuple[int, np.ndarray]]:
        """(first id, float32 [b, m k]) over the whole pool in id order, b <= batch_rows."""
        for fi in range(len(self.files)):
            n = int(self.counts[fi])
            for s in range(0, n, batch_rows):
                e = min(n, s + batch_rows)
                yield int(self.offsets[fi]) + s, weight_blocks(self.blocks(fi, s, e), self.etas, weighting)

    def locate(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(file index, row) [len(ids)] of global ids."""
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            raise IndexError(f"sample ids out of range [0, {self.n})")
        fi = np.searchsorted(self.offsets, ids, side="right") - 1
        return fi, ids - self.offsets[fi]

    def gather(self, ids, weighting: str = "tracin") -> np.ndarray:
        """float32 [len(ids), m k] for arbitrary ids (grouped by file; order preserved)."""
        ids = np.asarray(ids, np.int64)
        out = np.zeros((len(ids), self.dim), np.float32)
        fi, rows = self.locate(ids)
        for f in np.unique(fi):
            sel = np.flatnonzero(fi == f)
            r = rows[sel]
            out[sel] = weight_blocks([b[r] for b in self.blocks(int(f))], self.etas, weighting)
        return out

    def records(self, ids, columns: Sequence[str] = ("uid", "key", "shard_url", "row")) -> list[dict]:
        """The score-file rows of ``ids`` (in the given order) as dicts of ``columns``."""
        ids = np.asarray(ids, np.int64)
        fi, rows = self.locate(ids)
        out: list[Optional[dict]] = [None] * len(ids)
        for f in np.unique(fi):
            sel = np.flatnonzero(fi == f)
            t = pq.read_table(self.files[int(f)], columns=list(columns)).take(pa.array(rows[sel]))
            for j, rec in zip(sel, t.to_pylist()):
                out[j] = rec
        return out  # type: ignore[return-value]

    def column(self, name: str) -> pa.ChunkedArray:
        """One score-file column over the whole pool, in id order (memory: that column)."""
        return pa.chunked_array([c for f in self.files for c in pq.read_table(f, columns=[name])[name].chunks])


def feature_path(score_file: Path, checkpoint: int) -> Path:
    """``shards/<id>.c<i>.npy`` beside ``shards/<id>.parquet`` (JobLayout.features without the URL)."""
    return score_file.with_name(f"{score_file.stem}.c{checkpoint}.npy")


# -- captions and metadata straight from the shards ---------------------------------------------------------

def read_text_members(url: str, keys: Optional[Iterable[str]] = None,
                      allow_pipe: bool = False) -> dict[str, dict]:
    """``{key: {"caption": str | None, "meta": dict}}`` for the samples of one shard that have a ``.txt`` or ``.json``
    member (only ``keys`` if given), streaming the tar and reading the bytes of those members only. Samples are
    grouped as :func:`pruner.io.shards.tar_samples` does; a repeated key keeps its first occurrence, as the reader
    does. Unreadable members give ``None`` / ``{}``. Stops once every wanted key has been read complete.
    ``url``: a path, fsspec URL or, with ``allow_pipe``, a ``pipe:`` command
    (pruner.jobfiles.JobFiles.trusted_pipes)."""
    want = None if keys is None else set(keys)
    out: dict[str, dict] = {}
    seen: set[str] = set()

    def read(key: str, ext: str) -> bool:
        return ext in ("txt", "json") and key not in seen and (want is None or key in want)

    with open_shard_stream(url, allow_pipe) as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
        for key, parts in tar_samples(tf, read):
            if key in seen:
                continue
            seen.add(key)
            texts = {ext: data for ext, (_, data) in parts.items() if data is not None}
            if texts:
                out[key] = {"caption": _caption(texts.get("txt")), "meta": _meta(texts.get("json"))}
            if want is not None and want <= seen:
                break
    return out


def _caption(raw: Optional[bytes]) -> Optional[str]:
    """The stripped UTF-8 text of a .txt member; None if absent or not UTF-8."""
    try:
        return None if raw is None else raw.decode("utf-8").strip()
    except ValueError:
        return None


def _meta(raw: Optional[bytes]) -> dict:
    """The JSON object of a .json member; {} if absent, invalid or not an object."""
    try:
        meta = {} if raw is None else json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _read_texts(keys: Sequence[str], urls: Sequence[str], pipes: Container[str]) -> dict[str, dict[str, dict]]:
    """``{url: read_text_members(url, its keys)}`` for samples given as parallel lists of keys and shard URLs; a
    ``pipe:`` URL is run only if it is one of ``pipes`` (pruner.jobfiles.JobFiles.trusted_pipes)."""
    by_url: dict[str, set[str]] = {}
    for key, url in zip(keys, urls):
        by_url.setdefault(url, set()).add(key)
    return {url: read_text_members(url, wanted, url in pipes) for url, wanted in by_url.items()}


def read_captions(records: Sequence[dict], pipes: Container[str] = frozenset()) -> list[Optional[str]]:
    """Captions of samples given as records with ``shard_url`` and ``key`` (one pass per distinct shard)."""
    found = _read_texts([r["key"] for r in records], [r["shard_url"] for r in records], pipes)
    return [(found[r["shard_url"]].get(r["key"]) or {}).get("caption") for r in records]


def sample_labels(score_files: Sequence[Path], label_key: Optional[str] = "classname",
                  caption_ids: Iterable[int] = (), pipes: Container[str] = frozenset()
                  ) -> tuple[pa.Array, dict[int, Optional[str]]]:
    """(labels, captions): ``str(meta[label_key])`` from each sample's json member, for every sample of
    ``score_files`` in id order (null where absent; all null without ``label_key``), and the captions of the
    samples ``caption_ids``. One streaming pass per shard over text members only, up to its last scored sample (so
    a shard the job read up to a cut is read no further; a progress bar on stderr); memory: one shard's texts plus
    the label column."""
    want = set(int(i) for i in caption_ids)
    categories: dict[str, int] = {}
    codes: list[np.ndarray] = []
    captions: dict[int, Optional[str]] = {}
    offset = 0
    for f in tqdm(score_files, desc="read labels", unit="shard", dynamic_ncols=True):
        t = pq.read_table(f, columns=["key", "shard_url"])
        keys, urls = t["key"].to_pylist(), t["shard_url"].to_pylist()
        texts = _read_texts(keys, urls, pipes)
        c = np.full(len(keys), -1, np.int32)
        for j, (key, url) in enumerate(zip(keys, urls)):
            rec = texts[url].get(key) or {}
            v = (rec.get("meta") or {}).get(label_key) if label_key else None
            if v is not None:
                c[j] = categories.setdefault(str(v), len(categories))
            if offset + j in want:
                captions[offset + j] = rec.get("caption")
        codes.append(c)
        offset += len(keys)
    idx = np.concatenate(codes) if codes else np.zeros(0, np.int32)
    labels = pa.DictionaryArray.from_arrays(pa.array(idx, mask=idx < 0), pa.array(list(categories), pa.string()))
    return labels, captions
