"""Combining per-checkpoint components into the method scores (one row per sample).

Every *score column* is oriented "higher = more helpful = keep", so one ranking rule serves all methods:

======================  ===================================================================  ===========
column                  value                                                                source
======================  ===================================================================  ===========
diffin_target           I(z,V) = sum_t a_t (T1 + T2), a_t = -t eta_t^2 / (N m)               methods §1
diffin_train            same with V = the reference batches (v = G_B): coreset selection     methods §1.3
diffin_self             I(z,z), same formula with V = z (data cleaning; see below)         methods §1.3
tracin_target           sum_t eta_t <g_t(z), v_t>                                            methods §2
tracin_pred             sum_t eta_t <g_t(z), -grad s<x,y>(V)> (prediction-score variant)    methods §2.1
tracin_self             -sum_t eta_t ||g_t(z)||^2                                            methods §2.1
oga_l2, oga_l1          -||g||_2 (exact), -||P g||_1 (projected) at the last checkpoint      methods §3
oga_iforest             Isolation Forest normality of P g at the last checkpoint             methods §3
baseline_loss           -l_z at the last checkpoint
baseline_clip_score     cos(x_z, y_z) at the last checkpoint
baseline_random         uniform [0, 1) from a hash of (seed, uid)
======================  ===================================================================  ===========

Sign convention of the influence values: positive = helpful (removing z would raise the target loss),
negative = harmful. Per-checkpoint components are kept as ``c<i>_<component>`` columns for audits.

diffin_self is I(z,z) as computed, not negated: without the first-order term (dropped, as in the official code)
it is the second-order part sum_t a_t (g^T H_B g + g^T H_z G) with a_t < 0, so strongly self-influential
(high-curvature) samples get large *negative* values and rank lowest, like harmful samples in every other
column. methods.md leaves this sign open; measured on the quality benchmark (swapped captions, 3 seeds on a GPU)
this orientation detects them at AUROC 0.67, the negated one at 0.33 (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def hash_unit(values: Sequence[str], salt: str) -> np.ndarray:
    """Deterministic uniform [0, 1) per string, from sha1(salt + value)."""
    return np.array([int.from_bytes(hashlib.sha1(f"{salt}:{v}".encode()).digest()[:8], "little") / 2.0 ** 64
                     for v in values], dtype=np.float64)


def combine(per_ckpt: list[dict[str, np.ndarray]], etas: Sequence[float], a_ts: Sequence[float],
            uids: Sequence[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Method score columns plus ``c<i>_<component>`` columns, all float64 arrays [n]."""
    out: dict[str, np.ndarray] = {}

    def weighted(name: str, weights) -> np.ndarray | None:
        if not all(name in c for c in per_ckpt):
            return None
        return sum(w * c[name] for w, c in zip(weights, per_ckpt))

    for target in ("target", "train", "self"):
        t1, t2 = weighted(f"t1_{target}", a_ts), weighted(f"t2_{target}", a_ts)
        if t1 is not None and t2 is not None:
            out[f"diffin_{target}"] = t1 + t2
    for name in ("target", "pred"):
        v = weighted(f"tracin_{name}", etas)
        if v is not None:
            out[f"tracin_{name}"] = v
    last = per_ckpt[-1]
    if "sq_norm" in last:  # exact norms and projected features are formed only when the job reads them
        out["tracin_self"] = -weighted("sq_norm", etas)
        out["oga_l2"] = -np.sqrt(last["sq_norm"])
    if "l1_feat" in last:
        out["oga_l1"] = -last["l1_feat"]
    out["baseline_loss"] = -last["loss"]
    out["baseline_clip_score"] = last["clip_score"].copy()
    out["baseline_random"] = hash_unit(uids, f"random-{seed}")
    for i, comp in enumerate(per_ckpt):
        for name, arr in comp.items():
            out[f"c{i}_{name}"] = arr
    return out
