"""Baselines at the last checkpoint: ``baseline_loss`` = -l_z, ``baseline_clip_score`` = cos(x_z, y_z) (the
statistic of the CLIP-score filters data teams run; the default pipeline filters by ``baseline_loss``,
pruner.config.TARGET_FREE_SCORE) and ``baseline_random``, uniform [0, 1) from a hash of (seed, uid)."""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from pruner.scores.methods.base import CombineWeights, Components, ScoreMethod


def hash_unit(values: Sequence[str], salt: str) -> np.ndarray:
    """Deterministic uniform [0, 1) per string, from sha1(salt + value)."""
    return np.array([int.from_bytes(hashlib.sha1(f"{salt}:{v}".encode()).digest()[:8], "little") / 2.0 ** 64
                     for v in values], dtype=np.float64)


class Baselines(ScoreMethod):
    def combine(self, per_ckpt: Components, weights: CombineWeights, uids: Sequence[str],
                seed: int) -> dict[str, np.ndarray]:
        last = per_ckpt[-1]
        return {"baseline_loss": -last["loss"], "baseline_clip_score": last["clip_score"].copy(),
                "baseline_random": hash_unit(uids, f"random-{seed}")}


METHOD = Baselines("baselines", ("baseline_loss", "baseline_clip_score", "baseline_random"))
