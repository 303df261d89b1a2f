"""The filter stage in front of the ranking (``select.filter_score``, ``select.filter_fraction``): the samples whose
filter score is among the lowest ``fraction`` of the pool are set apart, and the ranking orders everything by one
derived column, ``select_score``, in memory bounded like :mod:`pruner.select.rank` (one score file at a time):

* a sample that passes the filter has its ``select.score`` as ``select_score``;
* one that does not has ``m - 1 - (c - f)`` with f its filter score, c the filter's cut-off and m the smallest
  ``select.score`` among the passing samples: below every passing sample, in the order of the filter score. A
  budget larger than what passes the filter is filled from the best of the filtered ones, by the filter score;
* NaN in either score gives NaN (never kept).

So ``select`` / ``write_ranking`` / ``write_manifests`` run unchanged on the staged copies with that column, and the
ranking's rank is the pipeline's order. Passing is exact: the filter's cut-off is an exact bounded-memory
selection (:func:`pruner.select.rank.select`) of ``1 - fraction`` of the pool by the filter score (ties by uid).

The niche stage (``select.niche_alpha``, :func:`apply_niche`) follows on the passing samples: the ones that stand out
in the target score lead, and every other sample follows by the filter score (all of them without a niche); it
rewrites ``select_score`` to that order (one more read and write of the staged copies).
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pruner.select.niche import niche_test
from pruner.select.rank import Selection, select

SELECT_SCORE = "select_score"


def filter_selection(files: Sequence[Path], filter_score: str, fraction: float) -> Selection:
    """The samples that pass the filter stage: all but the ``fraction`` of the pool with the lowest filter score."""
    return select(files, filter_score, keep_fraction=float(1 - Fraction(str(fraction))))


def passing(fsel: Selection, table: pa.Table) -> np.ndarray:
    """bool [rows]: which samples of a score table pass the filter ``fsel``."""
    return fsel.is_kept(table[fsel.score].to_numpy(zero_copy_only=False), table["uid"])


def apply_filter(files: Sequence[Path], score: str, fsel: Selection, fraction: float,
                 out_dir: Path) -> tuple[list[Path], dict, float]:
    """Copies of the score ``files`` in ``out_dir`` with the column :data:`SELECT_SCORE` (module docstring), the
    stage's record for summary.json (the filter score, fraction, cut-off and how many samples it set apart) and the
    floor of the passing samples: the smallest finite select_score among them (each finite select_score of a passing
    sample is at least that, every other sample's below it; inf when no passing sample has a finite score)."""
    floor = math.inf
    for f in files:  # the smallest select.score among the passing samples
        t = pq.read_table(f, columns=list(dict.fromkeys(["uid", score, fsel.score])))
        s = t[score].to_numpy(zero_copy_only=False)[passing(fsel, t)]
        s = s[np.isfinite(s)]
        if len(s):
            floor = min(floor, float(s.min()))
    low = 0.0 if math.isinf(floor) else floor
    cut = fsel.cutoff_score if fsel.n_keep else 0.0
    out = []
    for f in files:
        t = pq.read_table(f)
        ok = passing(fsel, t)
        derived = np.where(ok, t[score].to_numpy(zero_copy_only=False),
                           low - 1.0 - (cut - t[fsel.score].to_numpy(zero_copy_only=False)))
        path = out_dir / f.name
        pq.write_table(t.append_column(SELECT_SCORE, pa.array(derived, pa.float64())), path)
        out.append(path)
    stage = {"stage": "filter", "score": fsel.score, "fraction": fraction, "cutoff": fsel.cutoff_score,
             "passed": fsel.n_keep, "set_apart": fsel.n_total - fsel.n_keep}
    return out, stage, floor


def apply_niche(files: Sequence[Path], column: str, score: str, filter_score: str, alpha: float,
                floor: float | None, out_dir: Path) -> tuple[list[Path], dict]:
    """The niche test's stage (pruner.select.niche) of the target ``score``, read from ``column`` of ``files`` (the
    score itself, or the filter stage's staged select_score with its passing ``floor``): copies of the files in
    ``out_dir`` (replacing staged ones there) whose :data:`SELECT_SCORE` is the pipeline's order, and the stage's
    record for summary.json (with ``head``: how many samples lead the ranking, and ``rest_by``).

    A niche: its stand-out tail (the test's ``upper_tail`` best samples by ``column``, exact with ties by uid) leads,
    ``select_score = column - c`` (c: the tail's cut-off, so >= 0); every other sample follows by ``filter_score``,
    ``min(f - max f - 1, -1)`` (< 0; max over the finite f). Beyond the niche the budget goes to what the filter
    finds cleanest rather than to samples of small, noisy help to the target (benchmarks/RESULTS.md, issue 21). No
    niche: every sample by ``filter_score`` (``select_score = f``). Either way a sample whose target score or filter
    score is not finite gets NaN: never kept, as in the filter stage."""
    test = niche_test(files, column, alpha, floor=floor)
    head_n = test.upper_tail if test.niche else 0
    record = {**test.record(), "score": score, "head": head_n, "rest_by": filter_score}
    head, top = None, -math.inf
    if head_n:  # the head's cut-off, and the largest finite filter score to put the rest below it
        head = select(files, column, keep_count=head_n)
        for f in files:
            v = pq.read_table(f, columns=[filter_score])[filter_score].to_numpy(zero_copy_only=False)
            v = v[np.isfinite(v)]
            if len(v):
                top = max(top, float(v.max()))
        top = 0.0 if math.isinf(top) else top
    out = []
    for f in files:
        t = pq.read_table(f)
        target = t[score].to_numpy(zero_copy_only=False).astype(np.float64)
        fs = t[filter_score].to_numpy(zero_copy_only=False).astype(np.float64)
        if head is None:
            derived = fs.copy()
        else:
            ranked = t[column].to_numpy(zero_copy_only=False)
            derived = np.where(head.is_kept(ranked, t["uid"]), ranked - head.cutoff_score,
                               np.minimum(fs - top - 1.0, -1.0))
        derived[~(np.isfinite(target) & np.isfinite(fs))] = np.nan
        if SELECT_SCORE in t.column_names:
            t = t.drop_columns([SELECT_SCORE])
        path = out_dir / f.name
        pq.write_table(t.append_column(SELECT_SCORE, pa.array(derived, pa.float64())), path)
        out.append(path)
    return out, record
