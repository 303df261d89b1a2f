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

The niche stage (``select.niche_alpha``, :func:`apply_niche`) follows on the passing samples: with a niche in the
target score that order stands; without one (a target drawn like the pool), every sample is ranked by the filter
score instead (one more read and write of the staged copies).
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
        target = t[score].to_numpy(zero_copy_only=False).astype(np.float64)
        derived = np.where(ok, target, low - 1.0 - (cut - t[fsel.score].to_numpy(zero_copy_only=False)))
        derived[~np.isfinite(target)] = np.nan  # no target score: never kept, set apart or not
        path = out_dir / f.name
        pq.write_table(t.append_column(SELECT_SCORE, pa.array(derived, pa.float64())), path)
        out.append(path)
    stage = {"stage": "filter", "score": fsel.score, "fraction": fraction, "cutoff": fsel.cutoff_score,
             "passed": fsel.n_keep, "set_apart": fsel.n_total - fsel.n_keep}
    return out, stage, floor


def apply_niche(files: Sequence[Path], column: str, score: str, filter_score: str, alpha: float,
                floor: float | None, out_dir: Path) -> tuple[list[Path], dict]:
    """The niche test's stage (pruner.select.niche) of the target ``score``, read from ``column`` of ``files`` (the
    filter stage's staged select_score, with its passing ``floor``): does the target score single out samples that
    help the target more than the bulk of the pool does? Returns the files to rank by :data:`SELECT_SCORE` and the
    stage's record for summary.json (with ``ranked_by``: the score that orders the passing samples).

    A niche: the order of ``column`` stands (behind a filter stage: the passing samples by the target score), and
    ``files`` are returned as they are, with the filter stage's NaN rule. No niche (a target drawn like the pool
    itself): copies in ``out_dir`` (replacing staged ones there) with ``select_score = filter_score``, every sample
    by the filter score, which is the better ranking there (benchmarks/RESULTS.md, issue 21); a sample whose target
    score or filter score is not finite gets NaN: never kept, as in the filter stage."""
    test = niche_test(files, column, alpha, floor=floor)
    record = {**test.record(), "score": score, "ranked_by": score if test.niche else filter_score}
    if test.niche:
        return list(files), record
    out = []
    for f in files:
        t = pq.read_table(f)
        target = t[score].to_numpy(zero_copy_only=False).astype(np.float64)
        derived = t[filter_score].to_numpy(zero_copy_only=False).astype(np.float64)
        derived[~(np.isfinite(target) & np.isfinite(derived))] = np.nan
        if SELECT_SCORE in t.column_names:
            t = t.drop_columns([SELECT_SCORE])
        path = out_dir / f.name
        pq.write_table(t.append_column(SELECT_SCORE, pa.array(derived, pa.float64())), path)
        out.append(path)
    return out, record
