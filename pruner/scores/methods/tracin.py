"""TracIn (methods §2): ``tracin_target`` = sum_t eta_t <g_t(z), v_t>, ``tracin_pred`` (the prediction-score
variant), both from the target set, and ``tracin_self`` = -sum_t eta_t ||g_t(z)||^2 (exact norms)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pruner.scores.methods.base import CombineWeights, Components, ScoreMethod, weighted


class TracIn(ScoreMethod):
    def combine(self, per_ckpt: Components, weights: CombineWeights, uids: Sequence[str],
                seed: int) -> dict[str, np.ndarray]:
        out = {}
        for name in ("target", "pred"):
            v = weighted(per_ckpt, f"tracin_{name}", weights.etas)
            if v is not None:
                out[f"tracin_{name}"] = v
        if "sq_norm" in per_ckpt[-1]:  # formed only when a job reads norms (pruner.scorer.computed_quantities)
            out["tracin_self"] = -weighted(per_ckpt, "sq_norm", weights.etas)
        return out


METHOD = TracIn("tracin", ("tracin_target", "tracin_pred", "tracin_self"),
                target_set_columns=("tracin_target", "tracin_pred"), needs_norms=True)
