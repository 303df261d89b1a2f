"""Outlier Gradient Analysis: harmful samples as outliers in (projected) gradient space (methods §3).

An Isolation Forest with a fixed random_state is fitted once per job on the projected gradients of a
hash-selected subsample at the last checkpoint, then scores every sample. ``score_samples`` is higher for
more normal points, so it is already oriented "higher = keep". The trim budget (default 5%) is the share of
lowest-scoring samples OGA would drop; the job summary reports the cutoff at that budget.
"""
from __future__ import annotations

import numpy as np
from sklearn.ensemble import IsolationForest


def fit_isolation_forest(features: np.ndarray, seed: int = 0, trees: int = 100) -> IsolationForest:
    """features: [n, k] projected gradients (any float dtype)."""
    if len(features) < 2:
        raise ValueError("Isolation Forest needs at least 2 subsample rows (fix: raise scores.oga.iforest_sample)")
    return IsolationForest(n_estimators=trees, random_state=seed).fit(np.asarray(features, np.float32))


def iforest_scores(forest: IsolationForest, features: np.ndarray) -> np.ndarray:
    """[n] float64 normality scores (higher = more normal = keep)."""
    return forest.score_samples(np.asarray(features, np.float32)).astype(np.float64)
