"""Outlier Gradient Analysis (methods §3) at the last checkpoint: ``oga_l2`` = -||g||_2 (exact), ``oga_l1`` =
-||P g||_1 (projected; it estimates sqrt(2k/pi) ||g||_2, not OGA's raw-gradient L1 norm) and ``oga_iforest``, the
Isolation Forest normality of P g, which the scorer adds from the job's fitted forest (pruner.scores.oga)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pruner.scores.methods.base import CombineWeights, Components, ScoreMethod


class OGA(ScoreMethod):
    def combine(self, per_ckpt: Components, weights: CombineWeights, uids: Sequence[str],
                seed: int) -> dict[str, np.ndarray]:
        last, out = per_ckpt[-1], {}
        if "sq_norm" in last:
            out["oga_l2"] = -np.sqrt(last["sq_norm"])
        if "l1_feat" in last:
            out["oga_l1"] = -last["l1_feat"]
        return out


METHOD = OGA("oga", ("oga_l2", "oga_l1", "oga_iforest"), needs_features=True, needs_norms=True)
