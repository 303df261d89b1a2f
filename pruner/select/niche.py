"""The niche test in front of a target ranking (``select.niche_alpha``): does the target score single out samples that
help the target more than the bulk of the pool does, or is the target like the pool itself?

Why: ranking by help to a target beats a quality filter where the target is a niche of the pool (a few classes, a
domain); on a target drawn like the pool itself the help scores carry no niche and the proxy's own mismatch
statistic (the loss of the filter stage) is the better ranking (benchmarks/RESULTS.md, issue 21). A niche shows
in Diff-In's propagated target score as an upper tail that its lower tail does not mirror: the samples of the niche
stand out above the bulk, which is about symmetric around its median.

Statistic: with ``c = s - median(s)`` over the finite scores s of the pool (the upper median: the ceil(n/2)-th
largest), ``E(t) = #{c > t} - #{c < -t}`` and ``E* = max over t >= 0 of E(t)``: the largest excess of the upper
tail over the mirrored lower tail at any distance from the median (a pool count, not a score unit). Under the null
that the scores are symmetric around their median, sweeping t down from the largest |c| adds the n samples with
c != 0 one at a time, each above or below with probability 1/2 given how many end up on each side: E is a
random-walk bridge of n steps from 0 to ``balance`` = E(0) (0 or 1 for distinct scores; up to the number of scores
tied at the median otherwise), whose maximum reaches ``a`` >= max(0, balance) with probability about
exp(-2 a (a - balance) / n). The test calls the target a niche when E* exceeds the ``a`` at which that probability
is alpha, the bound ``(balance + sqrt(balance^2 + 2 n ln(1 / alpha))) / 2``. The level is approximate: the median
is estimated from the same scores, and its own error shifts every tail count by about n f(t) times that error. On
bell-shaped scores this costs little (measured false-positive rates at level 1e-3 over 10,000 symmetric pools of
1,000: Laplace 0.8e-3, Student-t3 1.8e-3, normal 3e-3; tests/test_niche.py checks level 0.05), on a flat density it
is large (uniform: 0.05), and scores on a grid coarse against their spread's 1/sqrt(n) (heavy ties) break the null.
Diff-In's scores are continuous and bell-shaped with heavy tails. An error of that kind keeps the target ranking, the
pipeline this test was put in front of; only "no niche" changes the ranking. ``upper_tail``: #{c > t} at the
maximising t, the size of the standing-out tail. E* never exceeds the niche's size, so a niche smaller than the bound is not found:
at alpha 1e-3 and balance 0 the bound is 1.86 sqrt(n) samples (2.6% of a 5,000-sample pool, 0.06% of 10 million).

Only Diff-In's propagated form shows a niche this way: its first-order forms and TracIn rank by the direction every
sample shares with the target, and their scores have no such tail even for a niche target (measured, RESULTS.md), so
the config allows the test with ``diffin_target`` of the propagated form only (pruner.config).

Memory: bounded, not growing with the pool. The median is :func:`pruner.select.rank.select`'s exact cut-off. Up to
``max_rows`` finite scores the statistic is exact (every |c| is a threshold); above that the thresholds are the |c|
of a strided subsample of ``max_rows`` scores, counted exactly over the whole pool in one more pass, so E* is the
maximum over those thresholds (never above the exact one; the gap is at most the samples between two thresholds).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq

from pruner.select.rank import select


@dataclass(frozen=True)
class NicheTest:
    """The test's outcome for one score column of a pool (module docstring)."""

    score: str          # the target score tested
    alpha: float        # the test's level
    samples: int        # n: the finite scores different from the median
    excess: int         # E*: samples
    upper_tail: int     # #{c > t} at the maximising t: samples
    balance: int        # E(0) = #{c > 0} - #{c < 0}: samples
    bound: float        # the E* a symmetric pool reaches with probability alpha: samples

    @property
    def niche(self) -> bool:
        return self.excess > self.bound

    def record(self) -> dict:
        """The stage's record for summary.json."""
        return {"stage": "niche_test", **asdict(self), "niche": self.niche}


def excess_bound(n: int, alpha: float, balance: int = 0) -> float:
    """The E* a symmetric pool of ``n`` samples with E(0) = ``balance`` reaches with probability about ``alpha``."""
    return (balance + math.sqrt(balance * balance + 2.0 * n * math.log(1.0 / alpha))) / 2.0


def tail_excess(centred: Iterable[np.ndarray], thresholds: np.ndarray) -> tuple[int, int, int, int]:
    """(E*, #{c > t*}, E(0), n) over the batches of centred scores ``centred`` (finite, float64), the maximum taken
    over the ``thresholds`` (sorted ascending, unique, starting with 0.0); n counts the c != 0."""
    up = np.zeros(len(thresholds) + 1, np.int64)
    low = np.zeros(len(thresholds) + 1, np.int64)
    for c in centred:  # bin i holds the c with thresholds[i-1] < |c| <= thresholds[i]: c > thresholds[j] iff i > j
        up += np.bincount(np.searchsorted(thresholds, c[c > 0], side="left"), minlength=len(up))
        low += np.bincount(np.searchsorted(thresholds, -c[c < 0], side="left"), minlength=len(low))
    above = np.cumsum(up[::-1])[::-1][1:]  # [j]: #{c > thresholds[j]}
    below = np.cumsum(low[::-1])[::-1][1:]
    j = int(np.argmax(above - below))
    return int(above[j] - below[j]), int(above[j]), int(above[0] - below[0]), int(up.sum() + low.sum())


def niche_test_values(values: np.ndarray, score: str, alpha: float) -> NicheTest:
    """The exact niche test of the scores ``values`` [n] held in memory (NaN and inf left out)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return _test(score, alpha, 0, 0, 0, 0)
    c = v - np.sort(v)[::-1][(len(v) + 1) // 2 - 1]  # about the upper median, as select's cut-off
    return _test(score, alpha, *tail_excess([c], np.unique(np.concatenate([[0.0], np.abs(c)]))))


def niche_test(files: Sequence[Path], score: str, alpha: float, floor: float | None = None,
               max_rows: int = 1 << 20, batch_rows: int = 1 << 16) -> NicheTest:
    """The niche test of column ``score`` over the score ``files`` (module docstring), over the finite scores
    ``>= floor`` when given (the filter stage's staged select_score: its passing samples are exactly those, the best
    of the column, so the median is still :func:`select`'s cut-off): exact in memory up to ``max_rows`` scores, else
    streamed (one counting pass, select's passes for the median, one pass for the thresholds' subsample and one
    counting them). Files are read in path order, so the subsample does not depend on the order they are given in."""
    files = sorted(files, key=str)
    n_rows = sum(pq.read_metadata(f).num_rows for f in files)
    stride = max(1, math.ceil(n_rows / max_rows))

    def batches():
        for f in files:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=[score]):
                v = b.column(0).to_numpy(zero_copy_only=False).astype(np.float64)
                yield v[np.isfinite(v) & (v >= floor)] if floor is not None else v[np.isfinite(v)]

    if stride == 1:
        return niche_test_values(np.concatenate([np.zeros(0), *batches()]), score, alpha)
    n_finite = sum(len(v) for v in batches())
    if n_finite == 0:
        return _test(score, alpha, 0, 0, 0, 0)
    median = select(files, score, keep_count=(n_finite + 1) // 2).cutoff_score
    sub, pos = [], 0
    for v in batches():  # every stride-th finite score of the pool, counted across batches
        sub.append(v[(-pos) % stride::stride])
        pos += len(v)
    sub = np.concatenate(sub) - median
    thresholds = np.unique(np.concatenate([[0.0], np.abs(sub)]))
    return _test(score, alpha, *tail_excess((v - median for v in batches()), thresholds))


def _test(score: str, alpha: float, excess: int, upper: int, balance: int, n: int) -> NicheTest:
    return NicheTest(score, alpha, n, excess, upper, balance, excess_bound(n, alpha, balance) if n else 0.0)
