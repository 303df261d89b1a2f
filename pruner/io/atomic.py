"""Atomic artefact writes: write to a temporary name in the same folder, fsync, then rename.

A reader (or a re-run after a crash) sees either the old file or the complete new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; artefacts get the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # read-only: tmp may be a hard link to a write-protected file (link_or_copy)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def update_json_atomic(path: str | os.PathLike, updates: dict) -> None:
    """Set ``updates``' keys in the JSON object file ``path`` (created if missing), leaving its other keys: a
    read-modify-write whose write is atomic (results files that several benchmarks fill, each its own keys)."""
    path = Path(path)
    write_json_atomic(path, {**(json.loads(path.read_text()) if path.exists() else {}), **updates})


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Give ``dst`` the content of ``src``, an artefact never modified in place: a hard link when both are on one
    filesystem (no bytes copied, e.g. a job's stored features reused by the job that extends it), else a copy.
    Either way through a temporary name, so ``dst`` is absent or complete at any moment."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(src, tmp)
