"""Feature store: per shard and checkpoint, projected gradients as a memory-mappable fp16 ``.npy`` [n, k], written
atomically. Row i is row i of the shard's score table (uid, key, shard_url, row, scores), which is their index.

An int8 copy of a features file (:class:`Int8Copies`: int8 rows with one float32 scale per row) is built
on first use by ``pruner rescore --target`` on a CPU, whose pass over it runs about twice as fast as over the fp16
file (benchmarks/RESULTS.md); the fp16 file stays the record every other reader uses."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pruner.io.atomic import atomic_path

log = logging.getLogger(__name__)


def save_features(path: str | Path, features: np.ndarray) -> None:
    """Write [n, k] features as float16 .npy (values beyond fp16 range would become inf: refuse them)."""
    f16 = np.asarray(features, dtype=np.float16)
    if not np.isfinite(f16).all():
        raise ValueError(f"features for {path} overflow float16 or are not finite")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, f16)


def load_features(path: str | Path, mmap: bool = True, copy_on_write: bool = False) -> np.ndarray:
    """[n, k] float16, memory-mapped read-only by default (``copy_on_write``: a writable private map, nothing
    copied and the file never written: what ``torch.from_numpy`` needs without a warning)."""
    return np.load(path, mmap_mode=("c" if copy_on_write else "r") if mmap else None, allow_pickle=False)


#: The int8 copy's row length is padded with zero columns to a multiple of this: ATen's int8-weight matmul
#: (pruner.rescore._dot_int8) gives wrong results, or crashes, for a row length that is not a multiple of 8.
INT8_ROW_MULTIPLE = 32


def quantize_rows(features: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [n, k'], scale float32 [n]) with features ~ q[:, :k] * scale[:, None]: symmetric per row, scale =
    max|row| / 127 (1 for an all-zero row), q = round(row / scale); k' is k rounded up to a multiple of
    :data:`INT8_ROW_MULTIPLE`, the extra columns 0. Error per element <= scale / 2, i.e. at most 1/254 of the row's
    largest magnitude. ``chunk`` rows at a time in float32 (memory: chunk x k x 4 bytes beyond the output)."""
    n, k = features.shape
    q = np.zeros((n, -(-k // INT8_ROW_MULTIPLE) * INT8_ROW_MULTIPLE), np.int8)
    scale = np.empty(n, np.float32)
    qt, st = torch.from_numpy(q), torch.from_numpy(scale)
    buf = torch.empty(min(chunk, n), k)
    for a in range(0, n, chunk):
        x = buf[:min(chunk, n - a)].copy_(torch.from_numpy(np.asarray(features[a:a + chunk])))
        sc = x.abs().amax(1) / 127
        sc = torch.where(sc > 0, sc, torch.ones_like(sc))
        qt[a:a + len(x), :k].copy_(x.div_(sc[:, None]).round_())
        st[a:a + len(x)] = sc
    return q, scale


class Int8Copies:
    """int8 copies (:func:`quantize_rows`) of fp16 features files, kept in ``cache_dir`` and reused while the
    source is the same file with the same size and modification time (inode, size and mtime name the copy; a copy
    of an earlier version of the file, a shard scored again, is removed when the new one is made).

    :meth:`get` memory-maps an existing copy; a missing one is quantized in memory and returned at once, and
    written to ``cache_dir`` (atomically, scales first) by ``writers`` background threads, at most ``in_flight``
    copies waiting at a time (memory: that many copies, 1 KiB per row at k = 1024). The first pass that needs the
    copies thus costs the quantization and little of the writing; every pass computes from the same int8 values.
    Writing a copy is best effort: one that fails (a full disk) is logged and made again next time, and what the
    pass computed, from the copy in memory, stands. Use as a context manager: leaving it waits for the writes."""

    def __init__(self, cache_dir: str | Path, writers: int = 2, in_flight: int = 4):
        self.cache_dir = Path(cache_dir)
        self._pool = ThreadPoolExecutor(writers, thread_name_prefix="int8-copy")
        self._slots = threading.BoundedSemaphore(in_flight)

    def _names(self, path: Path) -> tuple[Path, Path]:
        st = path.stat()
        stem = f"{path.stem}.{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"
        return self.cache_dir / f"{stem}.q8.npy", self.cache_dir / f"{stem}.scale.npy"

    def get(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """(q int8 [n, k'], scale float32 [n]) of the fp16 features file ``path`` (:func:`quantize_rows`)."""
        path = Path(path)
        q_path, scale_path = self._names(path)
        if q_path.exists() and scale_path.exists():
            return np.load(q_path, mmap_mode="c", allow_pickle=False), np.load(scale_path, allow_pickle=False)
        for old in self.cache_dir.glob(f"{path.stem}.[0-9]*-[0-9]*-[0-9]*.*.npy"):
            old.unlink(missing_ok=True)
        q, scale = quantize_rows(load_features(path, copy_on_write=True))
        self._slots.acquire()
        try:
            self._pool.submit(self._write, ((scale_path, scale), (q_path, q)))
        except BaseException:
            self._slots.release()
            raise
        return q, scale

    def _write(self, files) -> None:
        try:
            for target, array in files:
                with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, array)
        except OSError as e:
            log.warning("int8 copy %s not written (%s); it is made again by the next re-target (fix: free space in "
                        "%s, or re-target with --precision fp16)", target, e, self.cache_dir)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Wait for every write."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Int8Copies":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
