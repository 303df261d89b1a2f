"""The interface of a score method (pruner.scores.methods)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import numpy as np

Components = Sequence[Mapping[str, np.ndarray]]  # per checkpoint: {component name: float64 [n]}


class CombineWeights(NamedTuple):
    """Per-checkpoint weights of the combination (pruner.scores.weights): ``etas`` the LR summed over the updates a
    checkpoint stands for (TracIn), ``a_ts`` Diff-In's second-order weights, ``b_ts`` its first-order weights in the
    exact_increment form (None: the taylor form; the propagated form's components come weighted)."""

    etas: Sequence[float]
    a_ts: Sequence[float]
    b_ts: Sequence[float] | None = None


def weighted(per_ckpt: Components, name: str, weights: Sequence[float]) -> np.ndarray | None:
    """sum_t weights[t] * component ``name`` at checkpoint t, float64 [n]; None when a checkpoint lacks it."""
    if not all(name in c for c in per_ckpt):
        return None
    return sum(w * c[name] for w, c in zip(weights, per_ckpt))


@dataclass(frozen=True)
class ScoreMethod:
    """One score method. ``columns``: every column it can write, oriented "higher = more helpful = keep";
    ``target_set_columns``: those formed from the target set (absent from jobs without one); ``needs_features`` /
    ``needs_norms``: whether the passes must form projected features P g_z / exact per-sample gradient norms for it
    (neither is free: pruner.scorer.computed_quantities)."""

    name: str
    columns: tuple[str, ...]
    target_set_columns: tuple[str, ...] = ()
    needs_features: bool = False
    needs_norms: bool = False

    def produces(self, diffin_targets: Sequence[str], has_target: bool) -> list[str]:
        """The columns a job writes for this method (``diffin_targets``: scores.diffin.targets, used by Diff-In)."""
        return [c for c in self.columns if has_target or c not in self.target_set_columns]

    def combine(self, per_ckpt: Components, weights: CombineWeights, uids: Sequence[str],
                seed: int) -> dict[str, np.ndarray]:
        """Its columns (float64 [n] each) from the per-checkpoint components; a column whose components the passes
        did not form is left out."""
        raise NotImplementedError
