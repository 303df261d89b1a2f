"""Explaining (TracIn proponents/opponents over the stored features), gradient clustering and selection policies
(also through the job's reduce step), on a real small job: the demo pool's first two shards plus a shard of planted
duplicates (identical image and caption under new keys)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import make_bad_corpus, sample, variant, write_shard

from pruner.cli.explain import main as explain_main
from pruner.config import load_config
from pruner.explain.cluster import cluster_pool
from pruner.explain.index import PoolIndex, choose_params, fill_index, new_index
from pruner.explain.pool import PoolFeatures, read_text_members, sample_labels
from pruner.explain.query import QueryEncoder, explain
from pruner.io.layout import JobLayout
from pruner.io.shards import demo_pool_shards, demo_target_shards, shard_name
from pruner.report.html import build_report
from pruner.select.policies import balanced_quotas, greedy_dedup, rank_order, select_policy
from pruner.select.rank import order_key
from pruner.select.reduce import finalize
from tests.conftest import copy_job, small_job_config

N_DUPS = 3


def _write_dup_shard(path: Path, source: str, n: int) -> list[str]:
    """A tar holding copies (members renamed ``dup-<key>.*``) of the first n samples of ``source``, their json without
    the ``uid`` (a re-upload of the same pair under another name: a near-duplicate, not the same sample)."""
    keys, members = [], []
    with tarfile.open(source, "r:gz") as tf:
        for m in tf.getmembers():
            key = m.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == n:
                    continue
                keys.append(key)
            if key in keys:
                members.append((m, tf.extractfile(m).read()))
    with tarfile.open(path, "w") as out:
        for m, data in members:
            if m.name.endswith(".json"):
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "uid"}).encode()
            info = tarfile.TarInfo(f"dup-{m.name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            out.addfile(info, io.BytesIO(data))
    return keys


@pytest.fixture(scope="module")
def job(tmp_path_factory, micro_trajectory):
    """Run the real prune job once for the module. Returns (job dir, planted duplicate pairs as uid pairs)."""
    from pruner.jobs.prune import run

    tmp = tmp_path_factory.mktemp("explain")
    pool_shards = demo_pool_shards()[:2]
    extra = tmp / "dups" / "dups-000000.tar"
    extra.parent.mkdir()
    keys = _write_dup_shard(extra, pool_shards[0], N_DUPS)
    cfg = small_job_config(tmp, micro_trajectory, data={"shards": pool_shards + [str(extra)]})
    status, summary = run(load_config(data=cfg))
    assert status == 0
    root = Path(cfg["output_dir"]) / summary["job"]
    # the demo's json uids (md5 of the key), the copies' fallback uids
    pairs = [(hashlib.md5(k.encode()).hexdigest(), f"{shard_name(str(extra))}/dup-{k}") for k in keys]
    return root, pairs


@pytest.fixture(scope="module")
def pool(job):
    return PoolFeatures.open(job[0])


@pytest.fixture(scope="module")
def encoder(job):
    return QueryEncoder(job[0], device="cpu")


def _all_vectors(pool: PoolFeatures) -> np.ndarray:
    return np.concatenate([x for _, x in pool.batches(batch_rows=97)])


def _uid_ids(pool: PoolFeatures) -> dict[str, int]:
    return {u: i for i, u in enumerate(pool.column("uid").to_pylist())}


def test_pool_features_layout(job, pool):
    n = sum(pq.read_metadata(f).num_rows for f in pool.files)
    assert pool.n == n == 2 * 250 + N_DUPS
    assert pool.m == 3 and pool.k == 128 and pool.dim == 384
    cfg = json.loads(json.dumps(load_config(job[0] / "config.yaml", check_paths=False).model_dump()))
    assert pool.k == cfg["features"]["k"]
    # "tracin" view: blocks scaled by sqrt(eta); batches and gather agree
    x = _all_vectors(pool)
    ids = np.array([0, 5, pool.n - 1, 250])
    np.testing.assert_array_equal(pool.gather(ids), x[ids])
    blocks = pool.blocks(0)
    np.testing.assert_allclose(x[:3, :pool.k], np.sqrt(pool.etas[0]) * blocks[0][:3].astype(np.float32), rtol=1e-6)


def test_flat_search_equals_bruteforce(job, pool):
    index = PoolIndex.open(job[0], "flat")
    x = _all_vectors(pool).astype(np.float64)
    rng = np.random.default_rng(0)
    queries = np.concatenate([x[[3, 100, 400]], rng.normal(size=(3, pool.dim)) * np.abs(x).mean()]).astype(np.float32)
    k = 10
    scores, ids = index.search(queries, k)
    brute = queries.astype(np.float64) @ x.T
    for j in range(len(queries)):
        order = np.lexsort((np.arange(pool.n), -brute[j]))[:k]
        np.testing.assert_array_equal(ids[j], order)
        np.testing.assert_allclose(scores[j], brute[j][order], rtol=1e-9)
    # the raw faiss index agrees up to float32 near-ties at the cut (which the float64 re-scoring settles)
    d, i = index.index.search(queries, k)
    for j in range(len(queries)):
        assert len(set(i[j]) & set(ids[j])) >= k - 1
        np.testing.assert_allclose(d[j][:5], scores[j][:5], rtol=1e-4)
    # cached: a second open loads the saved index
    again = PoolIndex.open(job[0], "flat")
    assert again.meta["loaded"] and again.index.ntotal == pool.n


def test_ivf_recall_vs_flat_synthetic():
    """IVF-Flat and IVF-PQ over clustered synthetic vectors: recall@10 against the exact flat index."""
    rng = np.random.default_rng(0)
    n, d, nq, k = 20000, 64, 200, 10
    centers = rng.normal(size=(50, d)).astype(np.float32)
    x = (centers[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
    q = (centers[rng.integers(0, 50, nq)] + 0.5 * rng.normal(size=(nq, d))).astype(np.float32)
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    _, truth = flat.search(q, k)
    def recall(got):
        return np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)])

    for kind, min_recall, min_reranked in (("ivf_flat", 0.95, 0.95), ("ivf_pq", 0.3, 0.7)):
        p = choose_params(n, d, kind, nlist=64, nprobe=16, pq_m=16)
        index = fill_index(new_index(d, p), p, lambda: x, [x[:7000], x[7000:]], use_gpu=False)
        _, got = index.search(q, k)
        assert recall(got) >= min_recall, (kind, recall(got))
        # PoolIndex's re-ranking: 4k candidates re-scored exactly
        _, cand = index.search(q, 4 * k)
        exact = np.einsum("qd,qcd->qc", q, x[cand])
        reranked = np.take_along_axis(cand, np.argsort(-exact, 1)[:, :k], 1)
        assert recall(reranked) >= max(min_reranked, recall(got)), (kind, recall(reranked))
    # exhaustive probing makes IVF-Flat exact
    p = choose_params(n, d, "ivf_flat", nlist=64, nprobe=64)
    index = fill_index(new_index(d, p), p, lambda: x, [x], use_gpu=False)
    _, got = index.search(q, k)
    assert np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]) == 1.0


def test_ivf_pool_index_reranks_exactly(job, pool):
    flat = PoolIndex.open(job[0], "flat")
    ivf = PoolIndex.open(job[0], "ivf_flat", nlist=8, nprobe=8, save=False)
    pq_index = PoolIndex.open(job[0], "ivf_pq", nlist=8, nprobe=8, pq_m=24, save=False)
    q = pool.gather([7, 300])
    s0, i0 = flat.search(q, 10)
    s1, i1 = ivf.search(q, 10)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(s0, s1, rtol=1e-12)
    s2, i2 = pq_index.search(q, 10, rerank=pool.n)  # every candidate re-scored exactly: the exact top-10
    np.testing.assert_array_equal(i0, i2)


def test_query_pair_finds_identical_pool_sample(job, pool, encoder, tmp_path):
    root, pairs = job
    original, copy = pairs[0]
    ids = _uid_ids(pool)
    rec = pool.records([ids[original]])[0]
    with tarfile.open(rec["shard_url"], "r:gz") as tf:
        image = tf.extractfile(f"{rec['key']}.jpg").read()
        caption = tf.extractfile(f"{rec['key']}.txt").read().decode()
    img_path = tmp_path / "query.jpg"
    img_path.write_bytes(image)
    # the query's features are the stored features of that pair (fp16 storage aside)
    from pruner.explain.query import pair_sample
    qv = encoder.vectors([pair_sample(img_path, caption)])
    np.testing.assert_allclose(qv[0], pool.gather([ids[original]])[0], atol=2e-3 * np.abs(qv).max())
    out = tmp_path / "explain.json"
    result = explain(root, image=str(img_path), caption=caption, k=10, out=out, encoder=encoder)
    top = [h["uid"] for h in result["proponents"]]
    assert original in top and copy in top
    assert [h["rank"] for h in result["proponents"]] == list(range(10))
    assert all(h["caption"] for h in result["proponents"])
    hit = result["proponents"][top.index(original)]
    assert hit["caption"] == caption.strip() and hit["key"] == rec["key"] and hit["shard_url"] == rec["shard_url"]
    # opponents: the lowest TracIn scores of the pool, ascending
    x = _all_vectors(pool).astype(np.float64)
    brute = x @ qv[0].astype(np.float64)
    opp = [h["id"] for h in result["opponents"]]
    np.testing.assert_array_equal(opp, np.lexsort((np.arange(pool.n), brute))[:10])
    assert [h["score"] for h in result["opponents"]] == sorted(h["score"] for h in result["opponents"])
    # JSON and CSV written
    saved = json.loads(out.read_text())
    assert saved["query"]["type"] == "pair" and len(saved["proponents"]) == 10
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0] == "role,rank,uid,key,shard_url,row,score,caption" and len(csv_lines) == 21


def test_tracin_score_equals_direct_sum(job, pool, encoder, tmp_path):
    """score from the index == sum_i eta_i <P g_i(q), P g_i(z)> from the query blocks and the stored .npy files."""
    root, _ = job
    from pruner.io.shards import read_shard
    sample = read_shard(demo_target_shards()[0], max_samples=1)[0][0]
    blocks = encoder.blocks([sample])
    q = encoder.vectors([sample])
    index = PoolIndex.open(root, "flat")
    scores, ids = index.search(q, 5)
    for s, i in zip(scores[0], ids[0]):
        fi, row = pool.locate([i])
        score_file = pool.files[fi[0]]
        stored = [np.load(score_file.with_name(f"{score_file.stem}.c{c}.npy"))[row[0]].astype(np.float64)
                  for c in range(pool.m)]
        direct = sum(eta * float(np.dot(blocks[c][0].astype(np.float64), stored[c]))
                     for c, eta in enumerate(pool.etas))
        assert s == pytest.approx(direct, rel=1e-5)


def test_job_target_vector_is_mean_of_target_gradients(job, encoder):
    """P v_target (shared) == mean of the target samples' projected gradients (linearity), as --target computes."""
    root, _ = job
    cfg = load_config(root / "config.yaml", check_paths=False)
    shared = encoder.job_target_blocks()
    mean, n = encoder.target_blocks(cfg.target.shards, cfg.target.max_samples)
    assert n == cfg.target.max_samples
    for a, b in zip(shared, mean):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(a).max())
    result = explain(root, job_target=True, k=5, captions=False, encoder=encoder)
    assert result["query"]["type"] == "job_target" and len(result["proponents"]) == 5
    assert result["proponents"][0]["score"] >= result["proponents"][-1]["score"]


def test_spherical_kmeans_deterministic(job):
    root, _ = job
    a = cluster_pool(root, 6, seed=1, write=False, read_shards=False)["_arrays"]["cluster"]
    b = cluster_pool(root, 6, seed=1, write=False, read_shards=False)["_arrays"]["cluster"]
    np.testing.assert_array_equal(a, b)
    s = cluster_pool(root, 6, seed=1, typical=3)
    np.testing.assert_array_equal(s["_arrays"]["cluster"], a)
    t = pq.read_table(JobLayout(root).clusters_table)
    meta = json.loads(JobLayout(root).clusters_summary.read_text())
    assert len(t) == s["n_samples"] and t["cluster"].to_numpy().max() < 6
    assert sum(c["size"] for c in meta["clusters"]) == len(t)
    assert meta["label_key"] == "classname"
    c0 = meta["clusters"][0]
    assert len(c0["typical"]) == 3 and all(x["caption"] for x in c0["typical"])
    assert abs(sum(c0["label_share"].values()) - 1) < 1e-9
    assert "tracin_target" in c0["mean_scores"]
    assert set(t["label"].to_pylist()) <= {"airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse",
                                            "ship", "truck"}


def test_balanced_quotas():
    q = balanced_quotas([10, 10, 10], [10, 10, 10], 10)
    assert q.tolist() == [4, 3, 3]  # remainders tie: smaller group first
    q = balanced_quotas([100, 50, 3], [100, 50, 3], 76)  # exact 49.67, 24.84, 1.49
    assert q.tolist() == [50, 25, 1]
    q = balanced_quotas([10, 10], [2, 10], 10)  # group 0 has only 2 valid scores: shortfall moves to group 1
    assert q.tolist() == [2, 8]
    with pytest.raises(ValueError):
        balanced_quotas([2], [1], 2)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return make_bad_corpus(tmp_path_factory.mktemp("bad"))


def test_read_text_members_first_occurrence_and_unreadable(bad, tmp_path):
    texts = read_text_members(bad["duplicate_key"])  # dk-001 repeated adjacent, dk-000 repeated at the end
    assert {k: r["caption"] for k, r in texts.items()} == {k: f"a photo of {k}" for k in ("dk-000", "dk-001",
                                                                                             "dk-002")}
    assert read_text_members(bad["duplicate_key"], ["dk-001", "absent"]) == {
        "dk-001": {"caption": "a photo of dk-001", "meta": {"source": "dk-001"}}}
    assert read_text_members(bad["non_utf8_caption"])["nu-001"] == {"caption": None, "meta": {"source": "nu-001"}}
    assert [r["meta"] for r in read_text_members(bad["bad_json"]).values()] == [{"source": "bj-000"}, {}, {}]
    url = write_shard(tmp_path / "image-only.tar", [sample("a"), variant(sample("b"), txt=None, json=None)])
    assert list(read_text_members(str(url))) == ["a"]  # no text member: no record


def test_read_text_members_stops_after_wanted_keys(bad):
    url = bad["truncated_tar"]  # t-000..t-003, cut inside t-002.jpg
    with pytest.raises(tarfile.ReadError):  # reading on reaches the cut
        read_text_members(url)
    assert set(read_text_members(url, ["t-001", "t-000"])) == {"t-000", "t-001"}


@pytest.mark.parametrize("case", ["truncated_tar", "truncated_tgz"])
def test_sample_labels_of_a_truncated_shard(bad, tmp_path, case):
    """A job keeps the samples completed before a shard's cut (t-000, t-001); their labels and captions read."""
    f = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"key": ["t-000", "t-001"], "shard_url": [str(bad[case])] * 2}), f)
    labels, captions = sample_labels([f], "source", [1])
    assert labels.to_pylist() == ["t-000", "t-001"] and captions == {1: "a photo of t-001"}


def _check_group_counts(job_root, summary, groups_by_uid, fraction):
    keep = pq.read_table(summary["manifests"]["paths"]["keep.parquet"])
    assert len(keep) == summary["n_keep"]
    n = summary["n_total"]
    k = int(fraction * n)
    assert summary["n_keep"] == k
    sizes: dict = {}
    for g in groups_by_uid.values():
        sizes[g] = sizes.get(g, 0) + 1
    names = list(sizes)
    # independent largest-remainder allocation
    exact = {g: k * sizes[g] / n for g in sizes}
    base = {g: int(np.floor(exact[g])) for g in sizes}
    left = k - sum(base.values())
    order = sorted(sizes, key=lambda g: (-(exact[g] - base[g]), [x["group"] for x in summary["groups"]].index(g)))
    for g in order[:left]:
        base[g] += 1
    kept: dict = {}
    for u in keep["uid"].to_pylist():
        kept[groups_by_uid[u]] = kept.get(groups_by_uid[u], 0) + 1
    assert {g: kept.get(g, 0) for g in names} == {g: base[g] for g in names}
    assert {x["group"]: x["kept"] for x in summary["groups"]} == {g: base[g] for g in names}


def test_cluster_and_class_balanced_counts(job, pool):
    root, _ = job
    scores = pool.column("diffin_target").to_numpy()
    uids = pool.column("uid").to_pylist()
    s = select_policy(root, "cluster_balanced", "diffin_target", keep_fraction=0.4, n_clusters=6, seed=1,
                      keep_dir=root / "keep-cluster")
    clusters = pq.read_table(JobLayout(root).clusters_table)
    by_uid = dict(zip(clusters["uid"].to_pylist(), clusters["cluster"].to_pylist()))
    _check_group_counts(root, s, by_uid, 0.4)
    # within each cluster the kept samples are its best by score
    keep = s["keep"]
    for g in set(by_uid.values()):
        m = np.array([by_uid[u] == g for u in uids])
        if keep[m].any() and (~keep[m]).any():
            assert scores[m & keep].min() >= scores[m & ~keep].max()
    assert json.loads((root / "keep-cluster" / "policy.json").read_text())["policy"] == "cluster_balanced"

    c = select_policy(root, "class_balanced", "tracin_target", keep_fraction=0.3, keep_dir=root / "keep-class")
    labels = {}
    for f in pool.files:
        t = pq.read_table(f, columns=["uid", "key", "shard_url"])
        texts = read_text_members(t["shard_url"][0].as_py())
        for u, k in zip(t["uid"].to_pylist(), t["key"].to_pylist()):
            labels[u] = texts[k]["meta"]["classname"]
    _check_group_counts(root, c, labels, 0.3)
    manifest = json.loads((root / "keep-class" / "manifest.json").read_text())
    assert sum(len(v) for v in manifest.values()) == c["n_keep"]


def test_dedup_removes_planted_duplicates(job, pool):
    root, pairs = job
    ids = _uid_ids(pool)
    x = pool.gather(np.arange(pool.n), "unit")
    for a, b in pairs:
        assert float(x[ids[a]] @ x[ids[b]]) > 0.9999
    gram = x @ x.T
    np.fill_diagonal(gram, -1)
    for a, b in pairs:
        gram[ids[a], ids[b]] = gram[ids[b], ids[a]] = -1
    threshold = 0.9999
    assert gram.max() < threshold, "a non-planted pair is as close as the planted duplicates"
    scores = pool.column("diffin_target").to_numpy()
    uids = pool.column("uid").combine_chunks()
    order = rank_order(order_key(scores), uids)
    retained = set(greedy_dedup(lambda i: pool.gather(i, "unit"), order, threshold).tolist())
    position = {int(i): p for p, i in enumerate(order)}
    for a, b in pairs:
        better, worse = sorted((ids[a], ids[b]), key=position.get)
        assert better in retained and worse not in retained
    assert len(retained) == pool.n - len(pairs)
    # as a policy: top_k with dedup keeps K samples and never both copies
    s = select_policy(root, "top_k", "diffin_target", keep_fraction=0.9, dedup_threshold=threshold,
                      keep_dir=root / "keep-dedup")
    kept = set(pq.read_table(s["manifests"]["paths"]["keep.parquet"])["uid"].to_pylist())
    assert len(kept) == int(0.9 * pool.n)
    assert s["dedup"]["examined"] == s["dedup"]["retained"] + s["dedup"]["removed"]
    both_in_prefix = sum(max(position[ids[a]], position[ids[b]]) < s["dedup"]["examined"] for a, b in pairs)
    assert s["dedup"]["retained"] == len(kept) and s["dedup"]["removed"] >= both_in_prefix
    assert not any(a in kept and b in kept for a, b in pairs)
    plain = select_policy(root, "top_k", "diffin_target", keep_fraction=0.9, write=False)
    assert plain["n_keep"] == len(kept)
    # embedding space: CLIP embeddings at the last checkpoint, computed once and cached
    e = select_policy(root, "class_balanced", "diffin_target", keep_fraction=0.5, dedup_threshold=0.99999,
                      dedup_space="embedding", keep_dir=root / "keep-dedup-emb")
    emb = np.concatenate([np.load(p) for p in sorted((root / "explain" / "embeddings").glob("*.npy"))])
    assert emb.shape[0] == pool.n
    emb = emb.astype(np.float64) / np.linalg.norm(emb.astype(np.float64), axis=1, keepdims=True)
    for a, b in pairs:
        assert float(emb[ids[a]] @ emb[ids[b]]) > 0.99999
    kept = set(pq.read_table(e["manifests"]["paths"]["keep.parquet"])["uid"].to_pylist())
    assert len(kept) == int(0.5 * pool.n) and e["dedup"]["removed"] >= len(pairs)
    assert not any(a in kept and b in kept for a, b in pairs)


@pytest.mark.parametrize("policy,extra", [("cluster_balanced", ["select.n_clusters=4"]),
                                          ("class_balanced", ["select.dedup_threshold=0.9999"])])
def test_finalize_with_a_policy(job, pool, tmp_path, policy, extra):
    """The job's reduce step with select.policy: manifests, ranking `kept` and summary counts are the policy's."""
    root, cfg, shards = copy_job(job[0], tmp_path, [f"select.policy={policy}", "select.keep_fraction=0.4",
                                                    "select.filter_score=null"] + extra)  # the policy alone
    summary = finalize(cfg, JobLayout(root), shards, {})
    ref = select_policy(root, policy, "diffin_target", keep_fraction=0.4, n_clusters=4, seed=cfg.seed,
                        dedup_threshold=cfg.select.dedup_threshold, write=False)
    uids = np.array(pool.column("uid").to_pylist())  # id order, as the policy's keep mask
    expect = set(uids[ref["keep"]])
    assert len(expect) == int(0.4 * pool.n)
    assert set(pq.read_table(root / "keep" / "keep.parquet")["uid"].to_pylist()) == expect
    assert sum(len(v) for v in json.loads((root / "keep" / "manifest.json").read_text()).values()) == len(expect)
    ranking = pq.read_table(root / "ranking.parquet")
    assert ranking["rank"].to_pylist() == list(range(pool.n))
    assert set(np.array(ranking["uid"].to_pylist())[ranking["kept"].to_numpy()]) == expect
    s = ranking["diffin_target"].to_numpy()
    assert (np.diff(s) <= 0).all()  # still the score order, whatever the keep set
    assert summary["counts"]["kept"] == len(expect) and summary["counts"]["samples"] == pool.n
    assert summary["counts"]["dropped"] == pool.n - len(expect)
    assert summary["selection"] is None and "keep" not in summary["policy"]
    assert summary["policy"]["policy"] == policy and summary["policy"]["n_keep"] == len(expect)
    assert summary["manifests"]["paths"]["keep.parquet"].endswith("keep.parquet")
    assert json.loads((root / "summary.json").read_text())["policy"]["groups"] == summary["policy"]["groups"]
    assert (root / "keep" / "policy.json").exists()
    if policy == "class_balanced":
        assert summary["policy"]["dedup"]["removed"] >= 1  # the planted duplicates of the same class
        report = build_report(root, top=2, class_shards=2).read_text()
        assert "class_balanced" in report
    # policies read the whole job directory: a score file outside the pool is refused
    with pytest.raises(RuntimeError, match="outside the pool"):
        finalize(cfg, JobLayout(root), shards[:-1], {})


def test_finalize_top_k_unchanged(job, tmp_path):
    """Plain top-k (no policy, no dedup) reproduces the job's own reduce outputs byte for byte."""
    root, cfg, shards = copy_job(job[0], tmp_path, [])
    summary = finalize(cfg, JobLayout(root), shards, {})
    assert summary["selection"]["n_keep"] == summary["counts"]["kept"] and "policy" not in summary
    for name in ("ranking.parquet", "keep/keep.parquet", "keep/manifest.json", "keep/uids.npy"):
        assert (root / name).read_bytes() == (job[0] / name).read_bytes(), name
    assert not (root / "keep" / "policy.json").exists()


def test_cli_main(job, tmp_path, capsys):
    from pruner.cli.cluster import main as cluster_main
    root, pairs = job
    out = tmp_path / "cli.json"
    assert explain_main([str(root), "--uid", pairs[0][0], "-k", "4", "--out", str(out), "--no-captions",
                         "--rebuild-index"]) == 0
    r = json.loads(out.read_text())
    assert len(r["proponents"]) == 4 and out.with_suffix(".csv").exists()
    assert json.loads(Path(r["saved"]).read_text()) == r and Path(r["saved"]).parent == root / "explain" / "results"
    err = capsys.readouterr().err  # progress on stderr: the index build over every sample
    assert "faiss flat index: 100%" in err and f"{2 * 250 + N_DUPS}/{2 * 250 + N_DUPS}" in err
    assert explain_main([str(root), "--uid", "no-such-uid"]) == 2
    assert cluster_main([str(root), "--clusters", "4", "--no-shards"]) == 0
    assert "assign clusters: 100%" in capsys.readouterr().err
