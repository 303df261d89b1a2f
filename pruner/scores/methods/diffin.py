"""Diff-In (methods §1): ``diffin_target`` / ``diffin_train`` / ``diffin_self``, one per ``scores.diffin.targets``
entry, in the form the components carry (pruner.scores.combine's docstring has the formulas):

* propagated: ``prop_<target>`` per checkpoint, already weighted; summed;
* exact_increment (``b_ts`` given): sum_t a_t t1_<target> + b_t <first-order component>;
* taylor: sum_t a_t (t1_<target> + t2_<target>).

``diffin_self`` is -I(z,z) in the propagated and exact_increment forms (dominated by the positive first-order
part, so oriented like tracin_self) and I(z,z) in the taylor form (a_t < 0 makes high-curvature samples negative).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pruner.scores.methods.base import CombineWeights, Components, ScoreMethod, weighted

#: Diff-In target -> the first-order component of its exact_increment form
_FIRST_ORDER = {"target": "tracin_target", "train": "tracin_train", "self": "sq_norm"}


class DiffIn(ScoreMethod):
    def produces(self, diffin_targets: Sequence[str], has_target: bool) -> list[str]:
        return [c for c in super().produces(diffin_targets, has_target) if c.removeprefix("diffin_") in diffin_targets]

    def combine(self, per_ckpt: Components, weights: CombineWeights, uids: Sequence[str],
                seed: int) -> dict[str, np.ndarray]:
        out = {}
        for target, first in _FIRST_ORDER.items():
            prop = weighted(per_ckpt, f"prop_{target}", [1.0] * len(per_ckpt))
            if prop is not None:
                out[f"diffin_{target}"] = -prop if target == "self" else prop
                continue
            t1 = weighted(per_ckpt, f"t1_{target}", weights.a_ts)
            second = weighted(per_ckpt, f"t2_{target}", weights.a_ts) if weights.b_ts is None \
                else weighted(per_ckpt, first, weights.b_ts)
            if t1 is not None and second is not None:
                sign = -1.0 if target == "self" and weights.b_ts is not None else 1.0
                out[f"diffin_{target}"] = (t1 + second) * sign
        return out


METHOD = DiffIn("diffin", ("diffin_target", "diffin_train", "diffin_self"), target_set_columns=("diffin_target",))
