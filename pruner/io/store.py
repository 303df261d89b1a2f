"""Feature store: per shard and checkpoint, projected gradients as a memory-mappable fp16 ``.npy`` [n, k], written
atomically. Row i is row i of the shard's score table (uid, key, shard_url, row, scores), which is their index."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pruner.io.atomic import atomic_path


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

