"""Shard reading layer: list WebDataset shards, stream their samples, and account for every sample skipped.

Reading uses Python's ``tarfile`` in streaming mode (``r|*``, which also undoes gzip) rather than webdataset's
iterators, because webdataset reports bad data through exception handlers that drop or re-raise whole groups
without saying which member was at fault, and because plain ``tarfile`` silently treats a short or corrupt header
as the end of the archive. Here every member is seen one at a time, so each skipped sample is logged with its
member name and reason, and a truncated shard is detected (:class:`_StrictTarInfo`) instead of quietly read short.

Grouping follows the webdataset convention: a member ``dir/abc.seg.JPG`` has key ``dir/abc`` (path up to the first
dot of the basename) and extension ``seg.jpg`` (the rest, lower-cased); consecutive members with one key form a
sample. Members without a dot in their basename and non-regular members (directories, links) are ignored, as
webdataset does. A key that is not a plain file name (a folder part such as ``dir/abc``, ``..``, control
characters: :func:`unsafe_name`) is a reject ``unsafe_key``. The json member is optional (many datasets carry no metadata), so a sample without one is kept
with ``meta == {}``; a json member that is present but invalid is a reject.
"""
from __future__ import annotations

import contextlib
import io
import json
import posixpath
import subprocess
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand
from PIL import Image

from pruner.io.atomic import atomic_path

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"

SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # first present wins
_USED_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("txt", "json"))

REJECT_REASONS: tuple[str, ...] = (
    "unreadable_shard",   # the shard could not be opened or is not a tar archive (key "")
    "truncated_tar",      # the archive ends early or is corrupt; reading stopped there (key "")
    "missing_image",      # no .jpg/.jpeg/.png/.webp member
    "missing_caption",    # no .txt member
    "non_utf8_caption",   # .txt is not valid UTF-8
    "empty_caption",      # .txt is empty or whitespace only
    "bad_json",           # .json is not a valid JSON object
    "undecodable_image",  # Pillow cannot open and load the image
    "duplicate_key",      # the key already appeared earlier in this shard (the first occurrence is kept)
    "non_utf8_name",      # the member names are not valid UTF-8 (key recorded with \\x escapes)
    "unsafe_key",         # the key is not a safe file name: a path separator, '..', absolute, control characters
    "duplicate_uid",      # an earlier shard of the pool (sorted order) holds a sample with the same uid (reduce step)
)


@dataclass(frozen=True)
class Sample:
    """One accepted image-text pair."""

    url: str             # shard URL/path as listed
    key: str             # webdataset __key__
    uid: str             # json["uid"] when present, else f"{shard_name(url)}/{key}"
    image: Image.Image   # decoded, RGB
    caption: str         # stripped, non-empty, valid UTF-8
    meta: dict           # parsed json member, {} if there is none


class RejectLog:
    """Samples (or whole shards) the reader skipped, one record per skip: url, key, reason, detail."""

    _SCHEMA = pa.schema([("url", pa.string()), ("key", pa.string()), ("reason", pa.string()),
                         ("detail", pa.string())])

    def __init__(self, records: list[dict] | None = None):
        self.records: list[dict] = []
        # why the shard of an ``unreadable_shard`` record could not be opened (not stored: the reader's caller decides
        # whether another attempt can help, :func:`not_a_tar`)
        self.open_error: Exception | None = None
        for r in records or []:
            self.add(r["url"], r["key"], r["reason"], r["detail"])

    def add(self, url: str, key: str, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {REJECT_REASONS}")
        self.records.append({"url": url, "key": key, "reason": reason, "detail": detail})

    def counts(self) -> dict[str, int]:
        """Number of records per reason; reasons with no record are absent."""
        return dict(Counter(r["reason"] for r in self.records))

    def merge(self, other: "RejectLog") -> "RejectLog":
        """Append ``other``'s records to this log (in place) and return this log."""
        self.records.extend(dict(r) for r in other.records)
        return self

    def to_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.records, schema=self._SCHEMA)

    def write(self, path) -> None:
        """Write the log as Parquet (columns url, key, reason, detail), atomically."""
        with atomic_path(path) as tmp:
            pq.write_table(self.to_table(), tmp)

    @classmethod
    def read(cls, path) -> "RejectLog":
        return cls(pq.read_table(path).to_pylist())

    def __len__(self) -> int:
        return len(self.records)


def shard_name(url: str) -> str:
    """``<parent folder>/<file name>`` of a shard path or URL: the prefix of the uid of a sample whose json has no
    ``uid``. Sample identity is (shard, key); the parent folder is part of the name because lakes are often
    partitioned into folders of identically named shards (``2024/00000.tar``, ``2025/00000.tar``), and only that
    folder, not the whole path, so that uids, and the bank and scores picked by hashing them, do not change when
    the lake moves. :func:`check_shard_names` refuses a pool in which two shards share this name."""
    parent, base = posixpath.split(url.rstrip("/"))
    return posixpath.join(posixpath.basename(parent), base)


def sample_uid(url: str, key: str, meta: dict) -> str:
    """A sample's uid: its json ``uid`` (img2dataset / DataComp; a non-empty string or an integer), else the fallback
    ``<parent folder>/<shard file>/<key>`` (:func:`shard_name`)."""
    uid = meta.get("uid")
    if isinstance(uid, (str, int)) and not isinstance(uid, bool) and str(uid):
        return str(uid)
    return f"{shard_name(url)}/{key}"


def check_shard_names(urls: list[str]) -> None:
    """Raise ValueError naming both shards if two shards of a pool share :func:`shard_name`, so their samples without
    a json uid would share uids."""
    seen: dict[str, str] = {}
    for url in urls:
        other = seen.setdefault(shard_name(url), url)
        if other != url:
            raise ValueError(f"shards {other} and {url} are both named {shard_name(url)!r} (parent folder/file name), "
                             f"so their samples without a json \"uid\" would get the same uids <name>/<key> "
                             f"(fix: rename one of the folders or shards, or give every sample a json uid and list "
                             f"them under different folder names)")


def _check_pipe(spec: str, allow_pipe: bool) -> None:
    if spec.startswith("pipe:") and not allow_pipe:
        raise ValueError(f"shard spec {spec!r} is a pipe: URL, which runs a shell command, and is refused "
                         f"(fix: set data.allow_pipe: true if you trust this config)")


def _expand_one(spec: str, item: str) -> list[str]:
    """Shards named by one brace-expanded item: glob matches, a directory's shards, or the item itself."""
    try:
        fs, path = fsspec.core.url_to_fs(item)
    except (ImportError, ValueError) as e:
        raise ValueError(f"shard spec {spec!r}: cannot access {item!r}: {e} (fix: check the URL, or install "
                         f"the fsspec backend for its protocol, e.g. s3fs or gcsfs)") from None
    if any(c in path for c in "*?["):
        paths = [p for p in fs.glob(path) if p.endswith(SHARD_EXTENSIONS)]
    elif fs.isdir(path):
        paths = [p for p in fs.ls(path, detail=False) if p.endswith(SHARD_EXTENSIONS)]
    elif fs.exists(path):
        paths = [path]
    else:
        raise ValueError(f"shard spec {spec!r}: {item} does not exist (fix: check the path or brace range)")
    return paths if "://" not in item else [fs.unstrip_protocol(p) for p in paths]


def expand_shard_specs(specs: list[str], allow_pipe: bool = False) -> list[str]:
    """Expand shard specs into a sorted, de-duplicated list of shard paths/URLs.

    A spec is brace-expanded first (``shard-{000000..000099}.tar``); each result is then a glob (local or on an
    fsspec URL, keeping only .tar/.tar.gz/.tgz matches), a directory (its .tar/.tar.gz/.tgz files,
    non-recursive), or a single path/URL that must exist. Local paths come back absolute; fsspec URLs keep
    their protocol (``file://``, ``s3://``...). ``pipe:`` specs pass through unchanged when ``allow_pipe``.
    Raises ValueError naming the spec for a refused ``pipe:``, a missing path, or a spec matching no shard.
    """
    out: set[str] = set()
    for spec in [specs] if isinstance(specs, str) else specs:
        _check_pipe(spec, allow_pipe)
        if spec.startswith("pipe:"):
            out.add(spec)
            continue
        found = [p for item in braceexpand(spec) for p in _expand_one(spec, item)]
        if not found:
            raise ValueError(f"shard spec {spec!r} matches no .tar/.tar.gz/.tgz shard "
                             f"(fix: check the directory, glob or brace pattern)")
        out.update(found)
    return sorted(out)


@contextlib.contextmanager
def open_shard_stream(url: str, allow_pipe: bool = False):
    """A binary stream of the shard's bytes: a pipe command's stdout (only with ``allow_pipe``; ValueError
    otherwise), or the file opened through fsspec. A command stopped early (the reader had what it wanted) is
    killed on exit."""
    _check_pipe(url, allow_pipe)
    if not url.startswith("pipe:"):
        with fsspec.open(url, "rb") as f:
            yield f
        return
    proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)  # stderr: inherited
    try:
        yield proc.stdout
    finally:
        proc.stdout.close()
        if proc.poll() is None:  # stopped early (max_samples, error): do not leave the command running
            proc.kill()
        proc.wait()


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo whose header parser raises on an empty, short or corrupt header.

    ``tarfile`` treats those as the end of the archive, which would read a truncated shard short without notice.
    Only a proper end-of-archive block (all zeros) ends the archive; a tar without one counts as truncated.
    """

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(f"bad tar header ({e})") from None


class _Corrupt(Exception):
    def __init__(self, partial_key: str | None, cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.partial_key = partial_key


def _split_name(name: str) -> tuple[str | None, str]:
    """Webdataset (key, extension) of a member name; key None when the basename has no dot."""
    d, base = posixpath.split(name)
    if "." not in base:
        return None, ""
    stem, ext = base.split(".", 1)
    return posixpath.join(d, stem), ext.lower()


def tar_samples(tf: tarfile.TarFile, read: Callable[[str, str], bool]
                ) -> Iterator[tuple[str, dict[str, tuple[tarfile.TarInfo, bytes | None]]]]:
    """Yield (key, {extension: (member, bytes or None)}) per sample of a tar opened in stream mode (``r|*``): a run
    of consecutive regular members sharing a key (module docstring); a repeated extension starts a new run (same key
    twice in a row). ``read(key, extension)`` is asked for each member, after the run before it was yielded, and
    says whether to read its bytes. Keeps no TarInfo beyond the current run. Errors of the archive or byte stream
    (tarfile.ReadError, EOFError, zlib.error, OSError) propagate."""
    key, parts = None, {}
    for m in tf:
        tf.members = []  # stream mode would keep every TarInfo
        k, ext = _split_name(m.name) if m.isfile() else (None, "")
        if k is None:
            continue
        if parts and (k != key or ext in parts):
            yield key, parts
            parts = {}
        key = k
        parts[ext] = (m, tf.extractfile(m).read() if read(k, ext) else None)
    if parts:
        yield key, parts


def _groups(tf: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tuple[str, bytes | None]]]]:
    """Yield (key, {extension: (member name, bytes | None)}) per sample (:func:`tar_samples`). Bytes are read only
    for the extensions the reader uses (None otherwise). Raises :class:`_Corrupt` (with the key of the run being
    assembled, which is dropped because it may be incomplete) when the archive is truncated or corrupt.
    """
    assembling = None  # key of the last member seen, i.e. of the run not yet yielded

    def read(key: str, ext: str) -> bool:
        nonlocal assembling
        assembling = key
        return ext in _USED_EXTENSIONS

    try:
        for key, parts in tar_samples(tf, read):
            yield key, {ext: (m.name, data) for ext, (m, data) in parts.items()}
    except Exception as e:  # tarfile.ReadError, EOFError, zlib/OSError from the byte stream
        raise _Corrupt(assembling, e) from e


def printable(name: str) -> str:
    """A tar member name as valid UTF-8 text: bytes that are not UTF-8 (``tarfile`` keeps them as surrogate escapes,
    which Parquet and JSON cannot hold) become \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unsafe_name(name: str) -> str | None:
    """Why a sample key or tar member name is not a safe file name, or None when it is. Names from input become file
    names wherever a consumer extracts a tar (materialised shards included), so only plain names pass: no path
    separator ('/' or '\\', hence no absolute path and no '..' component), not '.' or '..', not empty, no control
    character. Decision: a key with a folder part (``dir/name``, which webdataset allows) is refused too, as the
    issue asking for this rule does; such shards are rare in image-text lakes (img2dataset and DataComp write flat
    keys) and the reject names the fix."""
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return f"it is {name!r}"
    if "/" in name or "\\" in name:
        return "it contains a path separator (an absolute path or a '..' component would write outside the folder " \
               "it is extracted into)"
    bad = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"it contains the control character {bad!r}"
    return None


def _make_sample(url: str, key: str, parts: dict) -> Sample | tuple[str, str]:
    """The Sample for one complete group, or (reason, detail) for the first check it fails (cheap checks first)."""
    where = f"sample {printable(key)!r} in {url} (members: {', '.join(printable(n) for n, _ in parts.values())})"
    if printable(key) != key:
        return "non_utf8_name", f"{where}: the member names are not valid UTF-8 (fix: rename them in UTF-8)"
    why = unsafe_name(key)
    if why is not None:
        return "unsafe_key", (f"{where}: the key is not a safe file name: {why} (fix: rename the members to plain "
                              f"names, e.g. replace '/' with '_')")
    ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    if ext is None:
        return "missing_image", f"{where} has no .jpg/.jpeg/.png/.webp image (fix: add it or drop the sample)"
    if "txt" not in parts:
        return "missing_caption", f"{where} has no .txt caption (fix: add a <key>.txt caption)"
    txt_name, raw = parts["txt"]
    try:
        caption = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return "non_utf8_caption", f"{txt_name} in {url}: caption is not valid UTF-8 ({e}) (fix: re-encode as UTF-8)"
    if not caption:
        return "empty_caption", f"{txt_name} in {url}: caption is empty or whitespace (fix: write a caption)"
    meta = {}
    if "json" in parts:
        json_name, raw = parts["json"]
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return "bad_json", f"{json_name} in {url}: invalid JSON ({e}) (fix: write valid JSON or drop the member)"
        if not isinstance(meta, dict):
            return "bad_json", (f"{json_name} in {url}: JSON is a {type(meta).__name__}, not an object "
                                f"(fix: write a JSON object)")
        if isinstance(meta.get("uid"), str) and printable(meta["uid"]) != meta["uid"]:
            return "bad_json", (f"{json_name} in {url}: its uid holds a lone surrogate escape, not valid Unicode "
                                f"(fix: write the uid as valid UTF-8)")
    img_name, raw = parts[ext]
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            image = im.convert("RGB")
    except Exception as e:  # Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return "undecodable_image", (f"{img_name} in {url}: image cannot be decoded ({type(e).__name__}: {e}) "
                                     f"(fix: re-encode the image or drop the sample)")
    return Sample(url=url, key=key, uid=sample_uid(url, key, meta), image=image, caption=caption, meta=meta)


def iter_shard(url: str, rejects: RejectLog, allow_pipe: bool = False,
               max_samples: int | None = None) -> Iterator[Sample]:
    """Stream the accepted samples of one .tar/.tar.gz/.tgz shard in tar order; log every skip in ``rejects``.

    ``url`` is a local path, an fsspec URL, or (only with ``allow_pipe``; ValueError otherwise) ``pipe:<command>``
    whose stdout is read. Never raises on bad data: a sample failing a check is logged with one of
    :data:`REJECT_REASONS` and skipped; a repeated key keeps its first occurrence; a truncated or corrupt archive
    stops reading with one ``truncated_tar`` record (key ""), after yielding every sample completed before it
    (the sample being assembled at that point is dropped); a shard that cannot be opened gives one
    ``unreadable_shard`` record. Stops after ``max_samples`` accepted samples (later samples are neither read
    nor logged).
    """
    _check_pipe(url, allow_pipe)
    if max_samples is not None and max_samples <= 0:
        return
    with contextlib.ExitStack() as stack:
        try:
            tf = stack.enter_context(tarfile.open(fileobj=stack.enter_context(open_shard_stream(url, allow_pipe)),
                                                  mode="r|*", tarinfo=_StrictTarInfo))
        except Exception as e:
            rejects.add(url, "", "unreadable_shard", f"cannot read {url} as a tar archive ({type(e).__name__}: {e}) "
                        f"(fix: check the path/URL, its permissions, and that it is a .tar/.tar.gz shard)")
            rejects.open_error = e
            return
        seen: set[str] = set()
        n_read = n_yielded = 0
        try:
            for key, parts in _groups(tf):
                n_read += 1
                if key in seen:
                    first = next(iter(parts.values()))[0]
                    rejects.add(url, printable(key), "duplicate_key", f"{printable(first)} in {url}: key "
                                f"{printable(key)!r} already appeared earlier "
                                f"in this shard; the first occurrence is kept (fix: give every sample a unique key)")
                    continue
                seen.add(key)
                sample = _make_sample(url, key, parts)
                if isinstance(sample, tuple):
                    rejects.add(url, printable(key), *sample)
                    continue
                yield sample
                n_yielded += 1
                if n_yielded == max_samples:
                    return
        except _Corrupt as e:
            dropped = f"; the partial sample {e.partial_key!r} was dropped" if e.partial_key is not None else ""
            rejects.add(url, "", "truncated_tar", f"{url}: archive is truncated or corrupt ({e}); stopped after "
                        f"{n_read} complete samples ({n_yielded} accepted){dropped} "
                        f"(fix: re-download or re-create the shard)")


def not_a_tar(error: Exception) -> bool:
    """Whether a shard's open error (:attr:`RejectLog.open_error`) says that its bytes are not a tar archive (an empty
    or garbage file, a broken gzip header): reading it again, on this node or another, cannot help. I/O errors (a
    missing file, permissions, the network) may be transient or node-specific and are not this."""
    return isinstance(error, (tarfile.TarError, EOFError, zlib.error)) or type(error).__name__ == "BadGzipFile"


def read_shard(url: str, allow_pipe: bool = False,
               max_samples: int | None = None) -> tuple[list[Sample], RejectLog]:
    """All accepted samples of one shard and the log of what was skipped (see :func:`iter_shard`)."""
    rejects = RejectLog()
    return list(iter_shard(url, rejects, allow_pipe=allow_pipe, max_samples=max_samples)), rejects


def demo_pool_shards() -> list[str]:
    """The bundled demo pool: 4 CIFAR-10 train shards x 250 samples (see pruner/demo/README.md)."""
    return sorted(str(p) for p in (DEMO_DIR / "pool").glob("*.tar.gz"))


def demo_target_shards() -> list[str]:
    """The bundled demo target set: 1 CIFAR-10 test shard of 200 samples."""
    return sorted(str(p) for p in (DEMO_DIR / "target").glob("*.tar.gz"))
