"""Combining per-checkpoint components into the method scores (one row per sample): each method's combination is
its own module under pruner.scores.methods; this module runs them, names the columns and documents them.

Every *score column* is oriented "higher = more helpful = keep", so one ranking rule serves all methods:

======================  ===================================================================  ===========
column                  value                                                                source
======================  ===================================================================  ===========
diffin_target           I(z,V), Diff-In in one of two forms (below)                           methods §1
diffin_train            same with V = the reference batches (v = G_B): coreset selection     methods §1.3
diffin_self             -I(z,z) (exact_increment) or I(z,z) (taylor), V = z (data cleaning)  methods §1.3
tracin_target           sum_t eta_t <g_t(z), v_t>                                            methods §2
tracin_pred             sum_t eta_t <g_t(z), -grad s<x,y>(V)> (prediction-score variant)    methods §2.1
tracin_self             -sum_t eta_t ||g_t(z)||^2                                            methods §2.1
oga_l2, oga_l1          -||g||_2 (exact), -||P g||_1 (projected) at the last checkpoint      methods §3
                        (||P g||_1 estimates sqrt(2k/pi) ||g||_2, not OGA's raw-gradient L1 norm)
oga_iforest             Isolation Forest normality of P g at the last checkpoint             methods §3
baseline_loss           -l_z at the last checkpoint
baseline_clip_score     cos(x_z, y_z) at the last checkpoint
baseline_random         uniform [0, 1) from a hash of (seed, uid)
======================  ===================================================================  ===========

Sign convention of the influence values: positive = helpful (removing z would raise the target loss),
negative = harmful. Per-checkpoint components are kept as ``c<i>_<component>`` columns for audits.

Diff-In's two forms (methods.md §1.2: the removal effect accumulates increments
delta_{t+1} - delta_t = -eta_t H delta_t + (eta_t / N) g_z(theta_t)), summed over the Delta_t updates each checkpoint
stands for: a_t = -t eta_t^2 Delta_t / N and b_t = eta_t Delta_t / N (pruner.scorer.checkpoint_weights; TracIn's
eta_i is likewise the LR summed over those updates):

* ``exact_increment`` (default): I(z,V) = sum_t b_t <v_t, g_z(theta_t)> + a_t <v_t, H_B g_z> (T1). The
  first-order increment is evaluated exactly at each checkpoint, where the scorer has g_z anyway; only the
  propagation term -eta H delta_t is approximated (delta_t ~ t eta g_z / N), as in the paper.
* ``taylor`` (the paper's and the official code's estimator): I(z,V) = sum_t a_t (T1 + T2), T2 = <v_t, H_z G_B>.
  Here the increment is Taylor-expanded around theta_0, g_z(theta_t) ~ g_z(theta_0) - t eta H_z G_B, and the
  offset g_z(theta_0) is dropped.
* ``propagated``: the recursion solved in closed form inside the gradient sketch (pruner.scores.propagation):
  I(z,V) = sum_t <w_t, P g_z(theta_t)> with w_t = b_t phi(h_t K_t) lambda_t, lambda_t the final target gradient
  carried back through exp(-h K) of the later intervals; per-checkpoint components ``prop_target``/``prop_train``
  (already weighted), and ``prop_self`` = b_t P g^T phi(h_t K_t) P g, whose sum is negated like tracin_self.

Why exact_increment is the default (tests/test_scores.py, sign_case; README, Decisions): on an AdamW
trajectory where the model learns, the Taylor form's T2, even with the actual displacement theta_0 - theta_t in
place of t eta G_B, is anti-correlated with the true change of <v, g_z> (Pearson -0.65 / -0.79 at the two
checkpoints), and the taylor form calls every clean pair harmful; the exact increment needs no such expansion.

diffin_self: in the taylor form it is I(z,z) as computed, not negated: that is the second-order part
sum_t a_t (g^T H_B g + g^T H_z G) with a_t < 0, so strongly self-influential (high-curvature) samples get large
*negative* values and rank lowest, like harmful samples in every other column (measured on the quality benchmark,
swapped captions, 3 seeds on a GPU: AUROC 0.67, the negated one 0.33; benchmarks/RESULTS.md). In the
exact_increment form I(z,z) = sum_t b_t ||g_z||^2 + a_t g^T H_B g is dominated by its positive first-order part,
so the column is -I(z,z), oriented like tracin_self.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from pruner.scores.methods import BUILTIN, METHODS, CombineWeights

#: The columns of a score table that describe the sample rather than score it (pruner.scorer.Scorer.score_table),
#: and those the ranking adds (pruner.select): everything else but the ``c<i>_`` components is a method score.
SAMPLE_COLUMNS = ("uid", "key", "shard_url", "row", "caption", "url")
RANKING_COLUMNS = ("rank", "kept", "select_score")
#: Score columns whose values are influences on a loss (removal convention), so that their sum over a set of samples
#: predicts the change of that loss caused by removing the set (data deletion, methods §1.3; pruner.deletion).
INFLUENCE_COLUMNS = ("diffin_target", "diffin_train", "tracin_target")


def removal_prediction(sums: dict[str, float], n_pool: float | None) -> dict[str, float]:
    """The predicted loss change of removing a set of samples, per influence column, from the sums of its columns
    over the set: Diff-In's columns carry b_t = eta_t / N already; TracIn's eta_t is the learning rate summed over
    the interval, of which one sample's share is 1/N, so its sum is divided by ``n_pool`` (N, the pool size the
    checkpoint weights were formed with; without it, TracIn's prediction is left out rather than given N times
    too large)."""
    return {c: v / n_pool if c == "tracin_target" else v for c, v in sums.items()
            if c != "tracin_target" or n_pool}


def method_of(column: str) -> str | None:
    """The registered score method (pruner.scores.methods) that writes ``column``, or None."""
    return next((name for name, m in METHODS.items() if column in m.columns), None)


def target_set_columns() -> list[str]:
    """The columns formed from the target set (a gradient over it: v_target, v_pred, pruner.scores.shared), absent
    from jobs without target samples."""
    return [c for m in METHODS.values() for c in m.target_set_columns]


def score_columns(methods: Sequence[str], diffin_targets: Sequence[str], has_target: bool) -> list[str]:
    """The score columns a job with these ``scores.methods``, ``scores.diffin.targets`` and (non-)empty
    ``target.shards`` produces, i.e. what ``select.score`` can rank by (each method's
    :meth:`~pruner.scores.methods.ScoreMethod.produces`)."""
    return [c for m in methods for c in METHODS[m].produces(diffin_targets, has_target)]


def combine(per_ckpt: list[dict[str, np.ndarray]], etas: Sequence[float], a_ts: Sequence[float],
            uids: Sequence[str], seed: int = 0, b_ts: Sequence[float] | None = None,
            methods: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Method score columns plus ``c<i>_<component>`` columns, all float64 arrays [n].

    Every built-in method writes the columns whose components are present (as the passes form them for the job),
    plug-in methods (pruner.scores.methods.register) only when named in ``methods``; in registration order, so
    score tables keep one column order. ``b_ts`` given: Diff-In in the exact_increment form (first-order weights
    b_t), else the taylor form (the propagated form's components come weighted)."""
    weights = CombineWeights(etas, a_ts, b_ts)
    out: dict[str, np.ndarray] = {}
    for name, method in METHODS.items():
        if name in BUILTIN or name in methods:
            out.update(method.combine(per_ckpt, weights, uids, seed))
    for i, comp in enumerate(per_ckpt):
        for name, arr in comp.items():
            out[f"c{i}_{name}"] = arr
    return out


def _component_checkpoint(name: str) -> int | None:
    """i for a ``c<i>_<component>`` column name (the naming of :func:`combine`), else None."""
    head, sep, _ = name.partition("_")
    return int(head[1:]) if sep and head[:1] == "c" and head[1:].isdigit() else None


def component_columns(names: Sequence[str], m: int) -> list[str]:
    """The ``c<i>_<component>`` column names of checkpoints 0..m-1 among ``names`` (the naming of :func:`combine`)."""
    return [c for c in names if (i := _component_checkpoint(c)) is not None and i < m]


def method_columns(names: Sequence[str]) -> list[str]:
    """The method score columns among a score table's or the ranking's column names: all but the sample, ranking
    and ``c<i>_`` component columns."""
    return [c for c in names if c not in SAMPLE_COLUMNS + RANKING_COLUMNS and _component_checkpoint(c) is None]


def split_components(columns: Mapping[str, np.ndarray], m: int) -> list[dict[str, np.ndarray]]:
    """The per-checkpoint components of checkpoints 0..m-1 from their ``c<i>_<component>`` columns (the inverse of
    the naming in :func:`combine`): a list of m {component: [n]} dicts, as :func:`combine` takes them."""
    comps: list[dict[str, np.ndarray]] = [{} for _ in range(m)]
    for c in component_columns(list(columns), m):
        head, _, name = c.partition("_")
        comps[int(head[1:])][name] = np.asarray(columns[c])
    return comps
