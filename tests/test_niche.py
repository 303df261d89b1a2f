"""pruner.select.niche: the tail-excess statistic against a brute-force count, its false-positive rate on symmetric
pools, its power on a pool with a niche, and the reduce step's use of it on real shards and score files."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from corpus import sample, write_shard

from pruner.config import TARGET_FREE_SCORE, load_config
from pruner.io.layout import JobLayout
from pruner.io.shards import read_shard
from pruner.select.niche import excess_bound, niche_test, niche_test_values, tail_excess
from pruner.select.reduce import finalize

FILTER = TARGET_FREE_SCORE  # the default filter stage's score


def brute_excess(scores: np.ndarray) -> tuple[int, int]:
    """(max over t in {0} and every |c| of #{c > t} - #{c < -t}, #{c > t} there), counted directly; c about the
    upper median of the finite scores."""
    s = np.sort(scores[np.isfinite(scores)])[::-1]
    c = s - s[(len(s) + 1) // 2 - 1]
    best = None
    for t in np.concatenate([[0.0], np.abs(c)]):
        e, u = int((c > t).sum() - (c < -t).sum()), int((c > t).sum())
        if best is None or e > best[0]:
            best = (e, u)
    return best


def score_files(root, scores: np.ndarray, n_files: int = 3) -> list:
    """``scores`` split over ``n_files`` real score files (uid, diffin_target)."""
    paths = []
    for j, part in enumerate(np.array_split(np.arange(len(scores)), n_files)):
        p = root / f"s{j}.parquet"
        pq.write_table(pa.table({"uid": [f"u{i:05d}" for i in part], "diffin_target": scores[part]}), p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_excess_matches_brute_force(tmp_path, seed):
    """Exact path (every |c| a threshold): equal to the direct count; subsampled thresholds (max_rows < n): never
    above it and at most the samples between two thresholds below; NaN scores are left out."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_t(3, 700), rng.normal(3.0, 0.5, 60 * seed), np.round(rng.normal(0, 1, 40), 1)])
    x[rng.choice(len(x), 7, replace=False)] = np.nan
    files = score_files(tmp_path, x)
    excess, upper = brute_excess(x)
    test = niche_test(files, "diffin_target", 0.01)
    assert (test.excess, test.upper_tail) == (excess, upper)
    finite = np.sort(x[np.isfinite(x)])[::-1]
    assert test.samples == int((finite != finite[(len(finite) + 1) // 2 - 1]).sum())
    sub = niche_test(files, "diffin_target", 0.01, max_rows=100)
    assert sub.samples == test.samples and excess - len(x) / 100 * 3 <= sub.excess <= excess


def test_in_memory_and_batched_counts_agree():
    rng = np.random.default_rng(5)
    c = rng.normal(0, 1, 500)
    t = np.unique(np.concatenate([[0.0], np.abs(c)]))
    assert tail_excess([c], t) == tail_excess(np.array_split(c, 7), t)


def test_ties_at_the_median_are_the_balance():
    """Scores tied at the median are left out of n and move E(0) (the balance); the bound conditions on it, so a
    symmetric pool with many ties there is no niche, while the bound of balance 0 would call it one."""
    x = np.concatenate([-np.arange(1.0, 401.0), np.zeros(300), np.arange(1.0, 401.0)])
    test = niche_test_values(x, "s", 1e-3)
    assert (test.samples, test.balance, test.excess) == (800, 0, 0) and not test.niche
    # 200 more above than below, the median on 300 ties: E rises to 200 and stays there down to t = 0, where the walk
    # ends (its balance), which a symmetric pool with these ties does as readily: no niche at this size
    x = np.concatenate([-np.arange(1.0, 301.0), np.zeros(300), np.arange(1.0, 501.0)])
    test = niche_test_values(x, "s", 1e-3)
    assert test.excess == test.balance == 200 and test.upper_tail == 500 and test.niche is False
    assert test.excess > excess_bound(test.samples, 1e-3)


@pytest.mark.parametrize("draw", [lambda r, n: r.normal(0, 1, n), lambda r, n: r.laplace(0, 1, n),
                                  lambda r, n: r.standard_t(3, n)], ids=["normal", "laplace", "t3"])
def test_false_positive_rate_on_symmetric_pools(draw):
    """Pools of 1,000 drawn symmetric around their median: the test at level 0.05 calls a niche in at most 9% of
    1,000 pools (about 5% from the bridge bound, up to ~7% more on the normal from the median's own error: the
    module docstring)."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(1000):
        test = niche_test_values(draw(rng, 1000), "s", 0.05)
        hits += test.niche
    assert hits / 1000 <= 0.09


def test_power_on_a_pool_with_a_niche():
    """10% of the pool shifted 3 sd up (a niche that helps the target, twice the smallest one the test can find
    at n 2000: the bound, 83 samples): found at level 1e-3 in every one of 50 pools; its upper tail holds most of
    the niche."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        x = np.concatenate([rng.normal(0, 1, 1800), rng.normal(3, 0.5, 200)])
        test = niche_test_values(x, "s", 1e-3)
        assert test.niche and test.upper_tail >= 160


def _job(root, diffin: np.ndarray, clip: np.ndarray, **select):
    """A scored job on two real tar shards (samples read back by pruner's reader) with score files holding
    ``diffin`` and ``clip`` (as the default filter score) in pool order; its config: the default pipeline with a
    target set (``select``: more select settings)."""
    n = len(diffin)
    pool = [str(write_shard(root / "pool" / f"{j}.tar", [sample(f"s{j}-{i:04d}") for i in range(n // 2)]))
            for j in range(2)]
    layout = JobLayout(root / "job")
    layout.shards_dir.mkdir(parents=True)
    for j, url in enumerate(pool):
        samples, rejects = read_shard(url)
        part = slice(j * (n // 2), (j + 1) * (n // 2))
        pq.write_table(pa.table({"uid": [x.uid for x in samples], "key": [x.key for x in samples],
                                 "shard_url": [url] * len(samples), "row": pa.array(range(len(samples)), pa.int32()),
                                 "diffin_target": diffin[part], FILTER: clip[part]}),
                       layout.scores(url))
        rejects.write(layout.rejects(url))
    cfg = load_config(data={"data": {"shards": [str(root / "pool")]}, "target": {"shards": [pool[0]]},
                            "trajectory": {"checkpoints": ["c.pt"]}, "select": {"keep_fraction": 0.3} | select},
                      check_paths=False)
    layout.config.write_bytes(cfg.to_yaml())
    return cfg, layout, pool


@pytest.mark.parametrize("niche", [True, False])
def test_reduce_ranks_by_the_target_score_only_where_there_is_a_niche(tmp_path, niche):
    """The default pipeline (filter stage, niche test at 1e-3 on the passing samples' diffin_target, keep 30%) on
    400 samples, one with no target score (never kept). With a niche (80 samples far above a symmetric bulk, about
    64 of them passing the filter against a bound of 33): the passing samples are ranked by diffin_target, the ones
    set apart follow by the filter score, and the keep set is the top of the passing samples by diffin_target.
    Without one (a symmetric bulk): the pool is ranked by the filter score alone. summary.json records the stages
    and the score that ranked; its select settings stay the configured ones."""
    rng = np.random.default_rng(3)
    diffin = rng.normal(0, 1, 400)
    if niche:
        diffin[rng.choice(400, 80, replace=False)] += 8.0
    clip = rng.normal(0, 1, 400)
    broken = int(np.argmax(clip))  # the best filter score, but no target score: never kept
    diffin[broken] = np.nan
    cfg, layout, pool = _job(tmp_path, diffin, clip)
    assert cfg.select.score == "diffin_target" and cfg.select.filter_score == FILTER
    summary = finalize(cfg, layout, pool, {})
    assert [s["stage"] for s in summary["stages"]] == ["filter", "niche_test", "top_k"]
    test = summary["stages"][1]
    assert test["niche"] is niche and test["alpha"] == 1e-3 and test["score"] == "diffin_target"
    assert test["samples"] == 318 and (test["excess"] > test["bound"]) is niche  # 320 passing, less NaN and median
    assert summary["select"] == cfg.select.model_dump(mode="json")
    want = "diffin_target" if niche else FILTER
    assert test["ranked_by"] == summary["score"] == want
    if niche:
        assert 55 <= test["upper_tail"] <= 90
    rows = pq.read_table(layout.ranking).to_pylist()
    assert rows[-1]["key"] == f"s{broken // 200}-{broken % 200:04d}"
    assert np.isnan(rows[-1]["select_score"]) and not rows[-1]["kept"]
    rows = rows[:-1]
    by_clip = lambda rs: sorted(rs, key=lambda r: (-r[FILTER], r["uid"]))  # noqa: E731
    passed = by_clip(rows)[:319]  # floor(0.8 x 400) pass the filter stage, one of them the broken sample
    if niche:
        expected = sorted(passed, key=lambda r: (-r["diffin_target"], r["uid"])) + by_clip(rows)[319:]
        assert sum(r["diffin_target"] > 4 for r in expected[:60]) == 60  # the niche's own samples lead
    else:
        expected = by_clip(rows)
        assert all(r["select_score"] == r[FILTER] for r in rows)
    assert [r["uid"] for r in rows] == [r["uid"] for r in expected]
    assert {r["uid"] for r in rows if r["kept"]} == {r["uid"] for r in expected[:120]}


@pytest.mark.parametrize("niche", [True, False])
def test_reduce_with_no_filter_stage_ranks_by_the_test_s_verdict(tmp_path, niche):
    """filter_fraction 0: no filter stage, the test runs on the whole pool. A niche: the pool is ranked by
    diffin_target itself (the column the reduce step was given); none: by the filter score. The sample with no
    target score is never kept."""
    rng = np.random.default_rng(5)
    diffin = rng.normal(0, 1, 400)
    if niche:
        diffin[rng.choice(400, 80, replace=False)] += 8.0
    clip = rng.normal(0, 1, 400)
    broken = int(np.argmax(clip))
    diffin[broken] = np.nan
    cfg, layout, pool = _job(tmp_path, diffin, clip, filter_fraction=0.0)
    summary = finalize(cfg, layout, pool, {})
    assert [s["stage"] for s in summary["stages"]] == ["niche_test", "top_k"]
    test = summary["stages"][0]
    assert test["niche"] is niche and test["samples"] == 398  # 400, less NaN and median
    want = "diffin_target" if niche else FILTER
    assert test["ranked_by"] == summary["score"] == want
    rows = pq.read_table(layout.ranking).to_pylist()
    assert rows[-1]["key"] == f"s{broken // 200}-{broken % 200:04d}" and not rows[-1]["kept"]
    kept = {r["uid"] for r in rows if r["kept"]}
    finite = [r for r in rows if np.isfinite(r["diffin_target"])]
    best = sorted(finite, key=lambda r: (-r[want], r["uid"]))[:120]
    assert len(kept) == 120 and kept == {r["uid"] for r in best}


@pytest.mark.parametrize("niche", [True, False])
def test_a_set_apart_sample_with_no_target_score_is_never_kept(tmp_path, niche):
    """keep 90% of 400 behind the 20% filter stage: the budget reaches into the set-apart samples, and the one
    among them with no target score (NaN) is never kept, with a niche or without."""
    rng = np.random.default_rng(7)
    diffin = rng.normal(0, 1, 400)
    if niche:
        diffin[rng.choice(400, 80, replace=False)] += 8.0
    clip = rng.normal(0, 1, 400)
    worst = int(np.argmax(-clip))  # the lowest filter score: set apart
    diffin[worst] = np.nan
    cfg, layout, pool = _job(tmp_path, diffin, clip, keep_fraction=0.9)
    summary = finalize(cfg, layout, pool, {})
    assert summary["stages"][1]["niche"] is niche
    rows = {r["key"]: r for r in pq.read_table(layout.ranking).to_pylist()}
    row = rows[f"s{worst // 200}-{worst % 200:04d}"]
    assert np.isnan(row["select_score"]) and not row["kept"]
    assert sum(r["kept"] for r in rows.values()) == 360


def test_niche_alpha_is_refused_where_the_test_does_not_apply():
    """Off by default where it cannot run (also when a job's config.yaml holds the default there, as it does after
    a --set that moves the job there); another explicit level there is an error naming the fix."""
    base = {"data": {"shards": ["/x"]}, "target": {"shards": ["/t"]}, "trajectory": {"checkpoints": ["c.pt"]}}
    assert load_config(data=base, check_paths=False).select.niche_alpha == 1e-3
    for extra in ({"select": {"score": "tracin_target"}}, {"scores": {"diffin": {"form": "exact_increment"}}},
                  {"select": {"filter_score": None}}, {"select": {"policy": "class_balanced"}},
                  {"select": {"threshold": 0.0}}, {"select": {"dedup_threshold": 0.9}}):
        cfg = load_config(data={**base, **extra}, check_paths=False)
        assert cfg.select.niche_alpha is None  # the default: off where it does not apply
        sel = {**extra.get("select", {}), "niche_alpha": 1e-3}
        assert load_config(data={**base, **extra, "select": sel}, check_paths=False).select.niche_alpha is None
        with pytest.raises(ValueError, match="niche_alpha.*fix: set select.niche_alpha: null"):
            load_config(data={**base, **extra, "select": {**sel, "niche_alpha": 0.01}}, check_paths=False)


def test_jobs_written_before_the_niche_test_reopen_without_it(tmp_path):
    """A job's config.yaml without niche_alpha (written before it existed) reopens with it off, the pipeline the
    job ran (pruner.config.JOB_LEGACY_DEFAULTS)."""
    from pruner.config import load_job_config
    base = {"data": {"shards": ["/x"]}, "target": {"shards": ["/t"]}, "trajectory": {"checkpoints": ["c.pt"]},
            "scores": {"diffin": {"form": "propagated"}}, "select": {"filter_score": "baseline_clip_score"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(base))
    assert load_job_config(tmp_path / "config.yaml").select.niche_alpha is None


def test_a_job_that_resolved_the_clip_score_reopens_with_it(tmp_path):
    """config.yaml stores what ``auto`` resolved to: a job written while the default filter was the CLIP score
    reopens with it (rescore and explain reproduce that job), while a new config's ``auto`` resolves to the loss."""
    from pruner.config import load_job_config
    base = {"data": {"shards": ["/x"]}, "target": {"shards": ["/t"]}, "trajectory": {"checkpoints": ["c.pt"]},
            "scores": {"diffin": {"form": "propagated"}},
            "select": {"score": "diffin_target", "filter_score": "baseline_clip_score", "niche_alpha": 1e-3}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(base))
    assert load_job_config(tmp_path / "config.yaml").select.filter_score == "baseline_clip_score"
    fresh = load_config(data={**base, "select": {}}, check_paths=False)
    assert (fresh.select.score, fresh.select.filter_score) == ("diffin_target", TARGET_FREE_SCORE)


def test_bound_values():
    """sqrt(n ln(1/alpha) / 2) for a balanced walk; (b + sqrt(b^2 + 2 n ln(1/alpha))) / 2 for one ending at b."""
    assert excess_bound(2000, 1e-3) == pytest.approx(83.112, abs=1e-3)
    assert excess_bound(2000, 1e-3, 100) == pytest.approx((100 + (100**2 + 4000 * np.log(1e3)) ** 0.5) / 2)
    assert excess_bound(2000, 1e-3, 100) == pytest.approx(146.994, abs=1e-3)


def test_streamed_test_on_the_filter_stages_staged_column(tmp_path):
    """The pipeline's use of the streamed path: the test of the staged select_score above the filter stage's floor
    (max_rows below the pool: the median by select, thresholds from a subsample) against the exact test of the
    passing samples' scores: the same n and balance, an excess never above the exact one and at most the samples
    between two thresholds below it."""
    from pruner.select.stages import apply_filter, filter_selection
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.normal(0, 1, 1800), rng.normal(4, 0.5, 200)])
    files = []
    for j, part in enumerate(np.array_split(rng.permutation(2000), 4)):
        p = tmp_path / f"s{j}.parquet"
        pq.write_table(pa.table({"uid": [f"u{i:05d}" for i in part], "diffin_target": x[part],
                                 "baseline_clip_score": rng.normal(0, 1, len(part))}), p)
        files.append(p)
    fsel = filter_selection(files, "baseline_clip_score", 0.2)
    (tmp_path / "staged").mkdir()
    staged, _, floor = apply_filter(files, "diffin_target", fsel, 0.2, tmp_path / "staged")
    passed = np.concatenate([pq.read_table(f)["diffin_target"].to_numpy()[
        fsel.is_kept(pq.read_table(f)["baseline_clip_score"].to_numpy(), pq.read_table(f)["uid"])] for f in files])
    exact = niche_test_values(passed, "diffin_target", 1e-3)
    streamed = niche_test(staged, "select_score", 1e-3, floor=floor, max_rows=160, batch_rows=64)
    assert len(passed) == 1600 and exact.niche and streamed.niche
    assert (streamed.samples, streamed.balance) == (exact.samples, exact.balance)
    assert exact.excess - 3 * 2000 / 160 <= streamed.excess <= exact.excess


def test_report_line_of_the_niche_stage_new_and_earlier_records():
    """The report states what ranked: the new record's ``ranked_by``; a summary.json reduced by the earlier rule
    (its stand-out tail led, the rest by ``rest_by``) still reads as what it did."""
    from pruner.report.html import _stage_fact
    base = {"stage": "niche_test", "score": "diffin_target", "upper_tail": 70, "excess": 60, "bound": 33.0,
            "alpha": 1e-3, "samples": 318}
    assert _stage_fact({**base, "niche": True, "ranked_by": "diffin_target"})[1].endswith(
        "a niche: diffin_target ranked")
    assert _stage_fact({**base, "niche": False, "ranked_by": "baseline_clip_score"})[1].endswith(
        "baseline_clip_score ranked the pool")
    assert _stage_fact({**base, "niche": True, "head": 70, "rest_by": "baseline_clip_score"})[1].endswith(
        "those 70 led the ranking, the rest followed by baseline_clip_score")
