"""pruner.select.rank against brute-force sorts on random data with heavy ties, NaNs, +-inf, -0.0 and uids that are
prefixes of each other or non-ASCII; real Parquet files, no mocks."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pruner.io.layout import JobLayout
from pruner.select.rank import order_key, select, write_ranking

N = 2000


def make_pool(seed: int = 0, n: int = N) -> pa.Table:
    """n samples: scores from 6 values (ties of ~300) incl. -0.0/0.0, +-inf and ~10% NaN; mixed uid styles."""
    rng = np.random.default_rng(seed)
    values = np.array([-math.inf, -1.5, -0.0, 0.0, 0.25, 3.0, math.inf, math.nan])
    score = values[rng.choice(len(values), n, p=[.02, .2, .15, .15, .2, .16, .02, .1])]
    styles = [lambda i: f"{rng.integers(2**63):016x}{i:016x}", lambda i: f"shard-{i % 7}/{i:06d}",
              lambda i: "a" * (i % 5 + 1) + str(i), lambda i: f"é{i}", lambda i: f"z{i % 13}x{i}"]
    uids = [styles[i % len(styles)](i) for i in range(n)]
    return pa.table({"uid": uids, "key": [f"{i:06d}" for i in range(n)],
                     "shard_url": [f"/data/shard-{i % 7}.tar" for i in range(n)],
                     "row": pa.array(np.arange(n) // 7, pa.int32()), "s": score,
                     "other": rng.normal(size=n)})


def brute_order(t: pa.Table, col: str = "s") -> list[str]:
    """uids best first: score desc, uid asc (as UTF-8 bytes), NaN last."""
    rows = zip(t[col].to_pylist(), t["uid"].to_pylist())
    return [u for s, u in sorted(rows, key=lambda r: (math.isnan(r[0]), 0.0 if math.isnan(r[0]) else -r[0],
                                                       r[1].encode()))]


def write_split(t: pa.Table, folder, parts: int, seed: int) -> list:
    """Shuffle the rows and split them into ``parts`` Parquet files of uneven size; return the paths shuffled."""
    rng = np.random.default_rng(seed)
    t = t.take(rng.permutation(len(t)))
    cuts = np.sort(rng.choice(np.arange(1, len(t)), parts - 1, replace=False)) if parts > 1 else []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(t)])):
        pq.write_table(t.slice(a, b - a), folder / f"part-{i}.parquet", row_group_size=97)
        paths.append(folder / f"part-{i}.parquet")
    return [paths[i] for i in rng.permutation(len(paths))]


def kept_uids(sel, t: pa.Table) -> set[str]:
    mask = sel.is_kept(t["s"].to_numpy(), t["uid"])
    return set(np.asarray(t["uid"].to_pylist(), dtype=object)[mask])


@pytest.fixture(scope="module")
def pool():
    return make_pool()


@pytest.fixture(scope="module")
def files(pool, tmp_path_factory):
    return write_split(pool, tmp_path_factory.mktemp("seven"), 7, seed=1)


def test_order_key_sorts_like_score_descending():
    x = np.array([3.0, -0.0, 0.0, -math.inf, math.inf, 1e-300, -1e-300, 5e-324, -2.5, math.nan, 7.0])
    k = order_key(x)
    finite = ~np.isnan(x)
    assert np.all(k[~finite] == np.uint64(2**64 - 1)) and np.all(k[finite] < np.uint64(2**64 - 1))
    assert k[1] == k[2]  # -0.0 ties with 0.0
    xs, ks = x[finite], k[finite]
    assert all((xs[i] > xs[j]) == (ks[i] < ks[j]) for i in range(len(xs)) for j in range(len(xs)))


@pytest.mark.parametrize("max_candidates", [1, 7, 1 << 20])
@pytest.mark.parametrize("crit", [{"keep_count": 1}, {"keep_count": 613}, {"keep_count": 1234},
                                  {"keep_count": 10**6}, {"keep_fraction": 0.3}, {"keep_fraction": 0.29},
                                  {"keep_fraction": 1.0}, {"keep_fraction": 1e-9}])
def test_select_top_k_is_exact(pool, files, crit, max_candidates):
    order = brute_order(pool)
    n_nan = int(np.isnan(pool["s"].to_numpy()).sum())
    k = crit.get("keep_count") or int(Fraction(str(crit["keep_fraction"])) * N)
    k = min(k, N - n_nan)
    sel = select(files, "s", **crit, max_candidates=max_candidates, batch_rows=128)
    assert (sel.n_total, sel.n_nan, sel.n_keep) == (N, n_nan, k)
    assert kept_uids(sel, pool) == set(order[:k])
    if k:
        assert sel.cutoff_uid == order[k - 1]
    else:
        assert sel.cutoff_uid is None and math.isnan(sel.cutoff_score)


def test_keep_fraction_uses_the_decimal_value(pool, files):
    assert select(files, "s", keep_fraction=0.29).n_keep == 580  # float 0.29 * 2000 is 579.99...


@pytest.mark.parametrize("thr", [-math.inf, -1.5, 0.0, -0.0, 0.1, 3.0, math.inf, 1e9])
def test_select_threshold_is_exact(pool, files, thr):
    s = pool["s"].to_numpy()
    sel = select(files, "s", threshold=thr)
    expected = set(np.asarray(pool["uid"].to_pylist(), dtype=object)[s >= thr])
    assert sel.n_keep == len(expected) and kept_uids(sel, pool) == expected
    assert set(brute_order(pool)[:sel.n_keep]) == expected  # a threshold keeps a prefix of the ranking


def test_selection_independent_of_files_and_order(pool, files, tmp_path):
    one = write_split(pool, tmp_path / "one", 1, seed=5)
    other = write_split(pool, tmp_path / "seven-b", 7, seed=9)
    for crit in ({"keep_count": 777}, {"keep_fraction": 0.5}, {"threshold": 0.25}):
        results = {select(f, "s", **crit, max_candidates=5) for f in (one, files, other, list(reversed(files)))}
        assert len(results) == 1, crit


@pytest.mark.parametrize("kw", [{}, {"buffer_rows": 300, "fan_in": 2, "row_group": 101}])
def test_write_ranking_matches_brute_force(pool, files, tmp_path, kw):
    sel = select(files, "s", keep_fraction=0.4)
    out = write_ranking(files, "s", tmp_path / "job" / "ranking.parquet", sel, **kw)
    r = pq.read_table(out)
    assert r.column_names == pool.column_names + ["rank", "kept"]
    assert r["rank"].to_pylist() == list(range(N))
    assert r["uid"].to_pylist() == brute_order(pool)
    assert r["kept"].to_pylist() == [i < sel.n_keep for i in range(N)]
    assert np.array_equal(r["kept"].to_numpy(), sel.is_kept(r["s"].to_numpy(), r["uid"]))
    by_uid = dict(zip(pool["uid"].to_pylist(), pool.select(["key", "row", "other"]).to_pylist()))
    rest = r.select(["key", "row", "other"]).to_pylist()
    assert all(by_uid[u] == x for u, x in zip(r["uid"].to_pylist(), rest))
    assert [p.name for p in out.parent.iterdir()] == ["ranking.parquet"]  # temporary runs removed


@pytest.mark.parametrize("kw", [{}, {"buffer_rows": 300, "fan_in": 2, "row_group": 101}])
def test_write_ranking_with_a_keep_mask(pool, files, tmp_path, kw):
    """An explicit keep set (a selection policy's) is carried through the sort, intermediate merges included."""
    rows = pa.concat_tables([pq.read_table(f) for f in files])
    mask = np.random.default_rng(3).random(len(rows)) < 0.3
    out = write_ranking(files, "s", tmp_path / "ranking.parquet", mask, **kw)
    r = pq.read_table(out)
    assert r.column_names == pool.column_names + ["rank", "kept"]
    assert r["uid"].to_pylist() == brute_order(pool)
    want = dict(zip(rows["uid"].to_pylist(), mask))
    assert r["kept"].to_pylist() == [want[u] for u in r["uid"].to_pylist()]
    with pytest.raises(ValueError, match="keep mask has 5 entries"):
        write_ranking(files, "s", tmp_path / "bad.parquet", mask[:5])


def test_all_nan_and_empty_files(tmp_path):
    t = pa.table({"uid": ["b", "a", "c"], "s": [math.nan] * 3})
    pq.write_table(t, tmp_path / "a.parquet")
    pq.write_table(t.slice(0, 0), tmp_path / "empty.parquet")
    files = [tmp_path / "a.parquet", tmp_path / "empty.parquet"]
    sel = select(files, "s", keep_count=2)
    assert (sel.n_total, sel.n_keep, sel.n_nan) == (3, 0, 3)
    r = pq.read_table(write_ranking(files, "s", tmp_path / "out" / "r.parquet", sel))
    assert r["uid"].to_pylist() == ["a", "b", "c"] and not any(r["kept"].to_pylist())


def test_errors_name_the_problem(pool, files, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        select(files, "s", keep_count=3, threshold=0.0)
    with pytest.raises(ValueError, match="nope"):
        select(files, "nope", keep_count=3)
    dup = pa.table({"uid": ["x"] * 5 + ["y"], "s": [1.0] * 6})
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="unique"):
        select([tmp_path / "dup.parquet"], "s", keep_count=2, max_candidates=2)
    sel = select([tmp_path / "dup.parquet"], "s", keep_count=2)
    with pytest.raises(ValueError, match="disagrees"):
        write_ranking([tmp_path / "dup.parquet"], "s", tmp_path / "r.parquet", sel)
    assert not (tmp_path / "r.parquet").exists()


def test_score_files_skips_rejects_sorted(tmp_path):
    (tmp_path / "shards").mkdir()
    for name in ("b-1.parquet", "a-2.parquet", "a-2.rejects.parquet", "a-2.c0.npy"):
        (tmp_path / "shards" / name).write_bytes(b"")
    assert [p.name for p in JobLayout(tmp_path).score_files()] == ["a-2.parquet", "b-1.parquet"]
