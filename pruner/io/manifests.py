"""Outputs of a :class:`~pruner.select.rank.Selection`: keep manifests, the DataComp subset file, the keep table,
and a materialized pruned WebDataset. No torch/ray/webdataset import (webdataset imports torch).

Files (``JobLayout.keep_dir``), all written atomically (temporary name, then rename) by :func:`write_manifests`:

* ``manifest.json``: ``{shard URL: sorted kept keys}``, one entry per shard of the pool (an empty list when none is
  kept, also for a shard without any scored sample, e.g. one whose samples were all rejected), so that
  :func:`kept_keys_filter` accepts every shard of the pool. URLs are the ``shard_url`` column, i.e. spelled as the
  scoring reader saw them, then the pool's other shards as given.
* ``uids.npy``: DataComp subset file, a 1-D numpy array of dtype ``np.dtype("u8,u8")`` (fields ``f0``, ``f1``),
  sorted ascending and unique, as ``resharder.py`` of mlfoundations/datacomp loads it (``load_subset`` asserts
  that dtype; lookups use ``np.searchsorted``). A 32-hex-digit uid ``h`` is ``(int(h[:16], 16), int(h[16:32], 16))``.
  Any other uid (e.g. the reader's ``<shard>/<key>`` fallback) is stored as the md5 of its UTF-8 bytes, big-endian
  (high 8 bytes, low 8 bytes); such uids, and hex uids not in lowercase, are listed in ``uids.fallback.parquet``
  (columns ``uid``, ``hex`` = 32-hex value stored) so :func:`load_uid_npy` gives back the original strings.
* ``keep.parquet``: ``uid``, ``key``, ``shard_url``, ``caption`` and ``url`` (the sample's json ``url``, null when it
  has none) of the kept samples, by score file path then row.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pruner.io.atomic import atomic_path, write_json_atomic
from pruner.io.shards import printable, sample_uid, tar_samples, unsafe_name

UID_DTYPE = np.dtype("u8,u8")  # DataComp's subset-file dtype: (high 64 bits, low 64 bits) of the 128-bit uid
KEEP_SCHEMA = pa.schema([("uid", pa.string()), ("key", pa.string()), ("shard_url", pa.string()),
                         ("caption", pa.string()), ("url", pa.string())])
FALLBACK_SCHEMA = pa.schema([("uid", pa.string()), ("hex", pa.string())])  # uids.fallback.parquet
_NIBBLE = np.zeros(256, np.uint64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _NIBBLE[ord(chr(_c).upper())] = _i
_SHIFTS = np.arange(60, -1, -4, dtype=np.uint64)
_READ_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, ValueError)


class MaterializeError(RuntimeError):
    """A source shard could not be read or lacks kept samples, or the written output differs from the manifest."""


def uid_to_u128(uids) -> tuple[np.ndarray, np.ndarray]:
    """``(values, canonical)``: values [n] :data:`UID_DTYPE` (see the module docstring for the mapping) and
    canonical [n] bool, True where the uid is exactly the lowercase 32-hex rendering of its value."""
    a = uids if isinstance(uids, (pa.Array, pa.ChunkedArray)) else pa.array(uids, pa.string())
    is_hex = pc.match_substring_regex(a, "^[0-9a-fA-F]{32}$").to_numpy(zero_copy_only=False)
    canonical = pc.match_substring_regex(a, "^[0-9a-f]{32}$").to_numpy(zero_copy_only=False)
    strs = a.to_numpy(zero_copy_only=False)
    out = np.zeros(len(strs), UID_DTYPE)
    if is_hex.any():
        nib = _NIBBLE[strs[is_hex].astype("S32").view(np.uint8).reshape(-1, 32)]
        out["f0"][is_hex] = np.bitwise_or.reduce(nib[:, :16] << _SHIFTS, axis=1)
        out["f1"][is_hex] = np.bitwise_or.reduce(nib[:, 16:] << _SHIFTS, axis=1)
    if (~is_hex).any():
        md5 = b"".join(hashlib.md5(u.encode()).digest() for u in strs[~is_hex])
        pairs = np.frombuffer(md5, ">u8").reshape(-1, 2)
        out["f0"][~is_hex], out["f1"][~is_hex] = pairs[:, 0], pairs[:, 1]
    return out, canonical


def u128_to_hex(values: np.ndarray) -> list[str]:
    """32-hex-digit strings of :data:`UID_DTYPE` values [n]."""
    return [f"{hi:016x}{lo:016x}" for hi, lo in values.tolist()]


def _fallback_path(npy_path: Path) -> Path:
    return npy_path.with_suffix(".fallback.parquet")


class KeepSet(Protocol):
    """What the writers need of a selection (:class:`pruner.select.rank.Selection` is one): the score column it
    ranks by, how many samples it keeps, and which rows of a score table are kept. A protocol, so that this I/O
    layer does not import the selection layer above it."""

    score: str
    n_keep: int

    def is_kept(self, scores, uids) -> np.ndarray: ...


def write_manifests(shard_files: Iterable[str | Path], selection: KeepSet, keep_dir: str | Path,
                    pool: Iterable[str] = ()) -> dict:
    """Write manifest.json, uids.npy (+ uids.fallback.parquet) and keep.parquet under ``keep_dir`` from the score
    files the selection was made on. Each file is written atomically, and none is replaced unless all four were
    written (they are renamed into place together at the end). ``pool``: the job's shard URLs; those no score
    file holds a sample of (a score file without rows names no URL) are listed in the manifest with no key.

    Each score file must hold one shard (one ``shard_url``), each shard in one file. Memory: one score file +
    16 bytes per kept sample (the uid array; 32 while it is concatenated, then sorted in place) + the pool's shard
    URLs; the keep table and the fallback uids are streamed to their Parquet files a score file at a time. Returns
    ``{"n_keep", "n_shards", "n_uid_fallback", "paths": {...}}``. Raises ValueError if a file holds several shard
    URLs or a URL is in two files, if two kept uids map to the same 128-bit value, or if the number kept differs
    from ``selection.n_keep``.
    """
    keep_dir = Path(keep_dir)
    paths = {n: keep_dir / n for n in ("manifest.json", "uids.npy", "keep.parquet")}
    paths["uids.fallback.parquet"] = _fallback_path(paths["uids.npy"])
    urls: set[str] = set()
    values, n_fallback = [], 0
    with contextlib.ExitStack() as stack:
        tmp = {n: stack.enter_context(atomic_path(p)) for n, p in paths.items()}
        manifest = stack.enter_context(open(tmp["manifest.json"], "w"))
        table = stack.enter_context(pq.ParquetWriter(tmp["keep.parquet"], KEEP_SCHEMA))
        fallback = stack.enter_context(pq.ParquetWriter(tmp["uids.fallback.parquet"], FALLBACK_SCHEMA))
        manifest.write("{")

        def entry(url: str, keys: list[str]) -> None:
            manifest.write(f"{',' if urls else ''}\n{json.dumps(url)}: {json.dumps(keys)}")
            urls.add(url)

        for f in sorted(Path(f) for f in shard_files):
            names = pq.read_schema(f).names  # caption / url: score files of older jobs lack them (null here)
            t = pq.read_table(f, columns=["uid", "key", "shard_url", selection.score]
                              + [c for c in ("caption", "url") if c in names])
            for c in ("caption", "url"):
                if c not in t.column_names:
                    t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
            found = pc.unique(t["shard_url"]).to_pylist()
            if len(found) > 1 or (found and found[0] in urls):
                raise ValueError(f"{f}: shard URLs {found[:3]} - each score file must hold exactly one shard, "
                                 f"each shard in one file")
            if not found:
                continue
            kept = t.filter(pa.array(selection.is_kept(t[selection.score].to_numpy(), t["uid"])))
            table.write_table(kept.select(KEEP_SCHEMA.names).cast(KEEP_SCHEMA))
            entry(found[0], sorted(kept["key"].to_pylist()))
            v, canonical = uid_to_u128(kept["uid"])
            values.append(v)
            if not canonical.all():
                fallback.write_table(pa.table({"uid": kept["uid"].filter(pa.array(~canonical)).cast(pa.string()),
                                               "hex": pa.array(u128_to_hex(v[~canonical]), pa.string())},
                                              schema=FALLBACK_SCHEMA))
                n_fallback += int((~canonical).sum())
        for url in pool:
            if url not in urls:
                entry(url, [])
        manifest.write("\n}\n")
        uids = np.concatenate(values) if values else np.zeros(0, UID_DTYPE)
        values.clear()  # the per-file arrays: one copy of the kept uids remains, sorted in place
        uids.sort()
        if len(uids) != selection.n_keep:
            raise ValueError(f"kept {len(uids)} samples but the selection keeps {selection.n_keep} "
                             f"(was it computed on other files?)")
        dup = np.flatnonzero(uids[1:] == uids[:-1])
        if dup.size:
            raise ValueError(f"{dup.size} kept uids collide as 128-bit values, e.g. {u128_to_hex(uids[dup[:3]])} "
                             f"(duplicate uids in the pool?)")
        with open(tmp["uids.npy"], "wb") as fh:
            np.save(fh, uids)
    return {"n_keep": len(uids), "n_shards": len(urls), "n_uid_fallback": n_fallback,
            "paths": {n: str(p) for n, p in paths.items()}}


def load_uid_npy(path: str | Path) -> list[str]:
    """The uids of a subset file in its (ascending 128-bit) order: 32-hex strings, replaced by the original uid
    where ``uids.fallback.parquet`` lies beside it and lists the value. Raises ValueError for another dtype."""
    path = Path(path)
    arr = np.load(path)
    if arr.dtype != UID_DTYPE or arr.ndim != 1:
        raise ValueError(f"{path}: dtype {arr.dtype} shape {arr.shape}, expected 1-D {UID_DTYPE} (DataComp)")
    hexes = u128_to_hex(arr)
    fb = _fallback_path(path)
    if not fb.exists():
        return hexes
    mapping = pq.read_table(fb, columns=["hex", "uid"]).to_pydict()
    original = dict(zip(mapping["hex"], mapping["uid"]))
    return [original.get(h, h) for h in hexes]


def _load_manifest(path: str | Path) -> dict[str, list[str]]:
    with open(path) as fh:
        return json.load(fh)


class KeptKeys:
    """webdataset ``select`` predicate: True iff ``sample["__key__"]`` is kept in shard ``sample["__url__"]``.
    Picklable (DataLoader workers). Raises KeyError for a shard URL absent from the manifest, because a URL spelled
    differently from scoring time would otherwise silently drop the whole shard. Memory: every kept key."""

    def __init__(self, manifest: dict[str, list[str]]):
        self.keys = {url: frozenset(keys) for url, keys in manifest.items()}

    def __call__(self, sample: dict) -> bool:
        keys = self.keys.get(sample["__url__"])
        if keys is None:
            raise KeyError(f"shard {sample['__url__']!r} is not in the keep manifest ({len(self.keys)} shards, e.g. "
                           f"{next(iter(self.keys), None)!r}); pass shard URLs spelled as when scoring")
        return sample["__key__"] in keys


def kept_keys_filter(manifest_path: str | Path) -> KeptKeys:
    """Predicate for ``webdataset.WebDataset(urls).select(kept_keys_filter("keep/manifest.json"))``."""
    return KeptKeys(_load_manifest(manifest_path))


def _samples(tf: tarfile.TarFile, want=None) -> Iterator[tuple[str, list]]:
    """(key, [(TarInfo, bytes)]) per sample, grouped as pruner.io.shards reads them (:func:`tar_samples`),
    streaming. With ``want``, only the first occurrence of each key in ``want`` (the one the reader scored), and
    only those members' bytes are read."""
    taken: set[str] = set()

    def take(key: str, ext: str = "") -> bool:
        return want is None or (key in want and key not in taken)

    for key, parts in tar_samples(tf, take):
        if take(key):
            taken.add(key)
            yield key, list(parts.values())


def _kept_samples(manifest: dict[str, list[str]]) -> Iterator[tuple[str, str, list]]:
    """(source shard URL, key, members) of the kept samples of every shard with kept keys, in manifest then tar order. A shard is read only up to its
    last kept sample, so one the reader accepted as truncated after it is copied. Raises MaterializeError naming a
    shard that cannot be read (or is cut) before all its kept keys were found, and the keys missing."""
    for url, keys in manifest.items():
        if not keys:
            continue
        want, found = set(keys), set()
        try:
            with fsspec.open(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
                for key, members in _samples(tf, want):
                    _check_names(url, key, members)
                    found.add(key)
                    yield url, key, members
                    if found == want:
                        break
        except _READ_ERRORS as e:
            missing = sorted(want - found)
            raise MaterializeError(f"cannot read shard {url} listed in the manifest ({type(e).__name__}: {e}); "
                                   f"{len(missing)} kept keys not read, e.g. {missing[:5]} (fix: re-download or "
                                   f"re-create the shard)") from e
        if found != want:
            missing = sorted(want - found)
            raise MaterializeError(f"shard {url}: {len(missing)} kept keys not found, e.g. {missing[:5]}")


def _check_names(url: str, key: str, members: list) -> None:
    """Raise MaterializeError naming a member whose name is not a safe file name (:func:`unsafe_name`): pruner's
    reader never scores such a sample, so only a manifest edited by hand or made elsewhere can ask for one."""
    for info, _ in members:
        why = unsafe_name(info.name)
        if why is not None:
            raise MaterializeError(f"shard {url}: kept sample {printable(key)!r} has the member {printable(info.name)!r}, "
                                   f"which is not a safe file name: {why}; it is not written (fix: remove the key "
                                   f"from the manifest, or rename the member in the source shard)")


def _tar_bytes(members: list) -> int:
    """Bytes a sample adds to a tar: a 512-byte header per member plus its data padded to 512 (PAX headers aside)."""
    return sum(512 + -(-len(data) // 512) * 512 for _, data in members)


#: Output shard names: pruner's own, or DataComp's and img2dataset's (``{:08d}.tar``, what DataComp's resharder
#: reads by default); each tar gets a ``<name>_stats.json`` and a ``<name>.parquet`` beside it.
NAMINGS = {"pruned": ("pruned-{:06d}", r"pruned-(\d{6})"), "datacomp": ("{:08d}", r"(\d{8})")}
#: The per-shard table beside each output tar (img2dataset's ``<shard>.parquet``: one row per sample, in tar order).
SHARD_TABLE_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("url", pa.string()),
                                ("caption", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                                ("source_shard", pa.string())])


def _shard_row(url: str, key: str, members: list) -> dict:
    """One sample's row of the per-shard table: its uid (json uid, else the reader's fallback), json url, caption."""
    data = {info.name.rsplit("/", 1)[-1].split(".", 1)[1].lower(): d for info, d in members if "." in info.name}
    try:
        meta = json.loads(data["json"]) if "json" in data else {}
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    caption = data["txt"].decode("utf-8", "replace").strip() if "txt" in data else None
    url_field = meta.get("url") if isinstance(meta.get("url"), str) else None
    return {"key": key, "uid": sample_uid(url, key, meta), "url": url_field, "caption": caption,
            "status": "success", "error_message": None, "source_shard": url}


def materialize(manifest_path: str | Path, out_dir: str | Path, samples_per_shard: int = 10000,
                max_shard_bytes: int | None = None, naming: str = "pruned") -> dict:
    """Copy the kept samples' tar members (names, headers and bytes unchanged) into new shards in ``out_dir``, in
    manifest order, then check the result with :func:`verify_materialized`.

    Names (``naming``, :data:`NAMINGS`): ``pruned-000000.tar``, ... or DataComp's / img2dataset's
    ``00000000.tar``, .... Beside each tar, img2dataset's conventions: ``<name>_stats.json`` (``count``,
    ``successes``, which DataComp's resharder reads as the shard's size, ``failed_to_download``, ``duration``, ...)
    and ``<name>.parquet`` (:data:`SHARD_TABLE_SCHEMA`: key, uid, json url, caption, status, error_message, the
    source shard); and ``sizes.json`` ({tar name: samples}: the shard table of DataComp's resharder, and what
    OpenCLIP's ``--train-data`` reads to size an epoch).

    Sources (.tar, .tar.gz; local paths or fsspec URLs, not ``pipe:``) are streamed with ``tarfile`` (``r|*``)
    up to their last kept sample (a source truncated after it, which the reader accepts, is fine); only kept
    members are held in memory, one sample at a time. A new output shard starts after ``samples_per_shard``
    samples, before a sample that would take it past ``max_shard_bytes`` (a single larger sample gets its own
    shard), or before a sample whose key is already in the current output shard (samples from different source
    shards may share a key; webdataset would merge adjacent ones, pruner's reader rejects a repeat as
    ``duplicate_key``). A key that ends one output shard and starts the next is not avoided: webdataset <= 0.2.86
    (the version OpenCLIP's trainer needs) groups members across shard boundaries when one stream reads several
    shards, so such shards are read one stream each; OpenCLIP's own grouping splits them correctly. Every file is written under a temporary name and renamed; outputs of this naming left from
    an earlier run beyond the new count are removed. Returns ``{"shards", "samples", "bytes"}``. Raises
    MaterializeError naming an unreadable source shard, kept keys missing from it, a member name that is not a safe
    file name, or an output that differs from the manifest.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if naming not in NAMINGS:
        raise ValueError(f"naming {naming!r}: one of {', '.join(NAMINGS)}")
    fmt, pattern = NAMINGS[naming]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = _kept_samples(_load_manifest(manifest_path))
    pending = next(samples, None)
    n_shards = n_samples = n_bytes = 0
    sizes = {}
    while pending is not None:
        name, t0 = fmt.format(n_shards), time.time()
        rows = []
        with atomic_path(out_dir / f"{name}.tar") as tmp:
            with open(tmp, "wb") as fh, tarfile.open(fileobj=fh, mode="w") as tar:
                written: set[str] = set()  # keys in this output shard
                while pending is not None and len(written) < samples_per_shard and pending[1] not in written and (
                        max_shard_bytes is None or not written
                        or fh.tell() + _tar_bytes(pending[2]) <= max_shard_bytes):
                    for info, data in pending[2]:
                        tar.addfile(info, io.BytesIO(data))
                    written.add(pending[1])
                    rows.append(_shard_row(*pending))
                    pending = next(samples, None)
            n_bytes += tmp.stat().st_size
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_TABLE_SCHEMA), tmp)
        write_json_atomic(out_dir / f"{name}_stats.json", {
            "count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0,
            "duration": time.time() - t0, "start_time": t0, "end_time": time.time(),
            "status_dict": {"success": len(rows)}, "written_by": "pruner materialize"})
        sizes[f"{name}.tar"] = len(rows)
        n_shards, n_samples = n_shards + 1, n_samples + len(written)
    for p in out_dir.iterdir():  # this naming's outputs of an earlier, longer run
        m = re.fullmatch(pattern + r"(\.tar|\.parquet|_stats\.json)", p.name)
        if m and int(m.group(1)) >= n_shards:
            p.unlink()
    write_json_atomic(out_dir / "sizes.json", sizes)
    verify_materialized(manifest_path, out_dir, naming)
    return {"shards": n_shards, "samples": n_samples, "bytes": n_bytes}


def verify_materialized(manifest_path: str | Path, out_dir: str | Path, naming: str = "pruned") -> dict:
    """Re-read the output tars of ``naming`` in ``out_dir`` and check that their samples' keys equal the manifest's
    kept keys as a multiset (so also the count), and that ``sizes.json`` and each ``_stats.json`` give every tar's
    count. Memory: every kept key. Returns ``{"shards", "samples"}``; raises MaterializeError with the counts and
    examples of missing/unexpected keys, or naming an unreadable shard."""
    expected = Counter(k for keys in _load_manifest(manifest_path).values() for k in keys)
    pattern = NAMINGS[naming][1]
    shards = sorted(p for p in Path(out_dir).glob("*.tar") if re.fullmatch(pattern + r"\.tar", p.name))
    sizes_path = Path(out_dir) / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    got: Counter = Counter()
    per_shard = {}
    for p in shards:
        try:
            with tarfile.open(p, mode="r|*") as tf:
                keys = [key for key, _ in _samples(tf)]
        except _READ_ERRORS as e:
            raise MaterializeError(f"cannot read output shard {p} ({type(e).__name__}: {e})") from e
        got.update(keys)
        per_shard[p] = len(keys)
    if got != expected:
        missing, extra = sorted((expected - got).elements()), sorted((got - expected).elements())
        raise MaterializeError(
            f"{out_dir}: {sum(got.values())} samples in {len(shards)} shards, manifest {manifest_path} lists "
            f"{sum(expected.values())}; {len(missing)} missing (e.g. {missing[:5]}), {len(extra)} unexpected "
            f"(e.g. {extra[:5]})")
    for p, n in per_shard.items():
        stats = p.with_name(p.name[:-4] + "_stats.json")
        counts = {"sizes.json": sizes.get(p.name), stats.name: json.loads(stats.read_text())["successes"]
                  if stats.exists() else None}
        if any(c != n for c in counts.values()):
            raise MaterializeError(f"{p} holds {n} samples, but {counts} (fix: materialize again)")
    return {"shards": len(shards), "samples": sum(got.values())}
