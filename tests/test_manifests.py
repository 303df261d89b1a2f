"""pruner.io.manifests on real WebDataset tar shards (tiny JPEGs) and real score files; no mocks."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from corpus import make_bad_corpus, sample, variant, write_shard
from PIL import Image

from pruner.config import load_config
from pruner.io.layout import JobLayout
from pruner.io.manifests import (UID_DTYPE, MaterializeError, kept_keys_filter, load_uid_npy, materialize,
                                 uid_to_u128, verify_materialized, write_manifests)
from pruner.io.shards import read_shard
from pruner.select.policies import select_policy
from pruner.select.rank import select
from pruner.select.reduce import finalize

PER_SHARD = 12


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, 7)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w:gz" if str(path).endswith(".gz") else "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """3 shards (.tar, .tar, .tar.gz) whose keys repeat across shards, their score files, and a 50% selection.
    Shard 0 has DataComp hex uids, shard 1 uppercase hex, shard 2 the reader's '<shard>/<key>' fallback."""
    root = tmp_path_factory.mktemp("job")
    layout = JobLayout(root / "run")
    layout.shards_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    urls, truth = [], {}
    for s, name in enumerate(["a.tar", "b.tar", "c.tar.gz"]):
        url = str(root / "pool" / name)
        (root / "pool").mkdir(exist_ok=True)
        keys = [f"{i:06d}" for i in range(PER_SHARD)]
        uids = [[f"{rng.integers(2**63):016x}{i:016x}" for i in range(PER_SHARD)],
                [f"{rng.integers(2**63):016X}{i:016X}" for i in range(PER_SHARD)],
                [f"{name}/{k}" for k in keys]][s]
        samples = [(k, {"jpg": jpeg(s * 100 + i), "txt": f"caption {s} {i}".encode(),
                        "json": json.dumps({"uid": uid}).encode()}) for i, (k, uid) in enumerate(zip(keys, uids))]
        write_tar(url, samples)
        scores = np.round(rng.normal(size=PER_SHARD), 1)
        scores[rng.integers(PER_SHARD)] = np.nan
        pq.write_table(pa.table({"uid": uids, "key": keys, "shard_url": [url] * PER_SHARD,
                                 "row": pa.array(range(PER_SHARD), pa.int32()), "diffin_target": scores}),
                       layout.scores(url))
        urls.append(url)
        truth.update({(url, k): (u, sc, dict(m)) for (k, m), u, sc in zip(samples, uids, scores)})
    files = layout.score_files()
    sel = select(files, "diffin_target", keep_fraction=0.5)
    info = write_manifests(files, sel, layout.keep_dir)
    return {"layout": layout, "urls": urls, "truth": truth, "sel": sel, "info": info, "files": files}


def expected_kept(job) -> dict[str, list[str]]:
    out = {url: [] for url in job["urls"]}
    for (url, key), (uid, sc, _) in job["truth"].items():
        if job["sel"].is_kept([sc], [uid])[0]:
            out[url].append(key)
    return {u: sorted(k) for u, k in out.items()}


def test_manifest_and_keep_table(job):
    keep = job["layout"].keep_dir
    manifest = json.loads((keep / "manifest.json").read_text())
    assert manifest == expected_kept(job)
    assert sum(map(len, manifest.values())) == job["sel"].n_keep == job["info"]["n_keep"] == 18
    t = pq.read_table(keep / "keep.parquet")
    assert t.column_names == ["uid", "key", "shard_url", "caption", "url"] and len(t) == 18
    assert t["caption"].null_count == 18  # these score files, made by hand, carry no caption (the scorer's do)
    assert {(u, k) for u, k in zip(t["shard_url"].to_pylist(), t["key"].to_pylist())} == {
        (u, k) for u, ks in manifest.items() for k in ks}
    assert sorted(p.name for p in keep.iterdir()) == ["keep.parquet", "manifest.json", "uids.fallback.parquet",
                                                      "uids.npy"]


def test_uids_npy_is_datacomp_compatible(job):
    arr = np.load(job["layout"].keep_dir / "uids.npy")
    assert arr.dtype == np.dtype("u8,u8") and arr.ndim == 1 and len(arr) == 18  # resharder's load_subset assert
    assert arr.tolist() == sorted(set(arr.tolist()))  # sorted and unique, as the resharder's searchsorted needs
    kept = [u for (uid_url, _), (u, sc, _) in job["truth"].items() if job["sel"].is_kept([sc], [u])[0]]
    for uid in kept:
        if len(uid) == 32:  # the resharder's own lookup: key_u16 = divmod(int(uid, 16), 2**64)
            key_u16 = np.array([divmod(int(uid, 16), 2**64)], UID_DTYPE)[0]
            assert np.searchsorted(arr, key_u16, "right") - np.searchsorted(arr, key_u16, "left") == 1
    assert sorted(load_uid_npy(job["layout"].keep_dir / "uids.npy")) == sorted(kept)
    assert job["info"]["n_uid_fallback"] == sum(not (len(u) == 32 and u == u.lower()) for u in kept) > 0


def test_uid_round_trip_and_fallback(tmp_path):
    uids = ["0123456789abcdef0123456789abcdef", "FFFFFFFFFFFFFFFF0000000000000001", "a.tar/000001", "", "é/1",
            "0123456789abcdef0123456789abcde"]  # last: 31 hex digits -> fallback
    vals, canonical = uid_to_u128(uids)
    assert vals[0].tolist() == (0x0123456789ABCDEF, 0x0123456789ABCDEF) and vals[1].tolist() == (2**64 - 1, 1)
    assert canonical.tolist() == [True, False, False, False, False, False]
    for u, v in zip(uids[2:], vals[2:]):
        assert f"{v[0]:016x}{v[1]:016x}" == hashlib.md5(u.encode()).hexdigest()
    kept = pa.table({"uid": uids, "key": [str(i) for i in range(6)], "shard_url": ["s.tar"] * 6,
                     "score": [1.0] * 6})
    pq.write_table(kept, tmp_path / "s.parquet")
    sel = select([tmp_path / "s.parquet"], "score", keep_fraction=1.0)
    write_manifests([tmp_path / "s.parquet"], sel, tmp_path / "keep")
    back = load_uid_npy(tmp_path / "keep" / "uids.npy")
    order = np.argsort(vals, order=["f0", "f1"])
    assert back == [uids[i] for i in order]


def test_manifest_filters_webdataset(job):
    pred = kept_keys_filter(job["layout"].keep_dir / "manifest.json")
    pred = pickle.loads(pickle.dumps(pred))  # DataLoader workers get a pickled copy
    ds = wds.WebDataset(job["urls"], shardshuffle=False).select(pred)
    got = sorted((s["__url__"], s["__key__"]) for s in ds)
    assert got == sorted((u, k) for u, ks in expected_kept(job).items() for k in ks)
    with pytest.raises(KeyError, match="not in the keep manifest"):
        pred({"__url__": "elsewhere/a.tar", "__key__": "000000"})


def test_materialize_copies_kept_members_and_verifies(job, tmp_path):
    manifest = job["layout"].keep_dir / "manifest.json"
    (tmp_path / "pruned-000099.tar").write_bytes(b"stale")
    res = materialize(manifest, tmp_path, samples_per_shard=5)
    shards = sorted(tmp_path.glob("pruned-*.tar"))
    assert res["samples"] == 18 and res["shards"] == len(shards) >= 4 and not (tmp_path / "pruned-000099.tar").exists()
    by_key: dict[str, list[dict]] = {}
    for s in wds.WebDataset([str(p) for p in shards], shardshuffle=False):
        by_key.setdefault(s["__key__"], []).append({k: v for k, v in s.items() if not k.startswith("__")})
    expected: dict[str, list[dict]] = {}
    for (url, key), (uid, sc, members) in job["truth"].items():
        if job["sel"].is_kept([sc], [uid])[0]:
            expected.setdefault(key, []).append(members)
    canon = lambda d: {k: sorted(map(repr, v)) for k, v in d.items()}  # noqa: E731
    assert canon(by_key) == canon(expected)
    assert verify_materialized(manifest, tmp_path) == {"shards": len(shards), "samples": 18}

    with tarfile.open(shards[0]) as tar:  # tamper: drop the last sample of the first shard
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    last = members[-1][0].name.split(".")[0]
    with tarfile.open(shards[0], "w") as tar:
        for m, data in members:
            if m.name.split(".")[0] != last:
                tar.addfile(m, io.BytesIO(data))
    with pytest.raises(MaterializeError, match=f"17 samples.*1 missing.*{last}"):
        verify_materialized(manifest, tmp_path)


def test_materialize_max_shard_bytes(job, tmp_path):
    res = materialize(job["layout"].keep_dir / "manifest.json", tmp_path, max_shard_bytes=6000)
    sizes = [p.stat().st_size for p in sorted(tmp_path.glob("pruned-*.tar"))]
    assert res["samples"] == 18 and len(sizes) == res["shards"] > 1
    assert all(s <= 6000 + 10240 for s in sizes)  # + the tar trailer/record padding


def test_materialize_fails_loudly_on_bad_sources(job, tmp_path):
    url = job["urls"][0]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({str(tmp_path / "gone.tar"): ["000001"]}))
    with pytest.raises(MaterializeError, match="gone.tar"):
        materialize(manifest, tmp_path / "out")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    manifest.write_text(json.dumps({str(tmp_path / "junk.tar"): ["000001"]}))
    with pytest.raises(MaterializeError, match="junk.tar"):
        materialize(manifest, tmp_path / "out")
    manifest.write_text(json.dumps({url: ["000001", "999999"]}))
    with pytest.raises(MaterializeError, match="999999"):
        materialize(manifest, tmp_path / "out")


@pytest.mark.parametrize("case", ["truncated_tar", "truncated_tgz"])
def test_materialize_stops_at_the_last_kept_sample(tmp_path, case):
    """A shard cut inside t-002 (which the reader accepts up to t-001) is copied when only samples before the cut
    are kept; a kept sample at or after the cut is a MaterializeError naming the shard and the missing keys."""
    url = str(make_bad_corpus(tmp_path / "bad")[case])
    accepted, rejects = read_shard(url)
    assert [s.key for s in accepted] == ["t-000", "t-001"] and rejects.counts() == {"truncated_tar": 1}
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({url: ["t-000", "t-001"]}))
    assert materialize(manifest, tmp_path / "out")["samples"] == 2
    back, rejects = read_shard(str(tmp_path / "out" / "pruned-000000.tar"))
    assert [(s.key, s.caption) for s in back] == [(s.key, s.caption) for s in accepted] and not len(rejects)
    for wanted, missing in ((["t-001", "t-003"], "t-003"), (["t-000", "t-002"], "t-002")):
        manifest.write_text(json.dumps({url: wanted}))
        with pytest.raises(MaterializeError, match=rf"{re.escape(url)}.*1 kept keys not read.*'{missing}'"):
            materialize(manifest, tmp_path / "out2")


def test_materialize_separates_equal_keys_from_different_shards(job, tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({url: ["000003"] for url in job["urls"]}))
    res = materialize(manifest, tmp_path / "out", samples_per_shard=10)
    assert res == {"shards": 3, "samples": 3, "bytes": res["bytes"]}  # same key back to back: new shard each time
    shards = sorted(map(str, (tmp_path / "out").glob("*.tar")))
    # webdataset (<= 0.2.86, pinned for OpenCLIP's trainer) groups members across shard boundaries, so a reader
    # streams each shard on its own; OpenCLIP's own grouping, which its trainer uses, splits them in one stream
    got = [s["txt"] for shard in shards for s in wds.WebDataset(shard, shardshuffle=False)]
    assert got == [b"caption 0 3", b"caption 1 3", b"caption 2 3"]
    from open_clip_train.data import tarfile_to_samples_nothrow
    streamed = list(tarfile_to_samples_nothrow([{"url": u} for u in shards]))
    assert [s["txt"] for s in streamed] == got


def _scored_job(root) -> tuple[JobLayout, list[str]]:
    """A job directory as the scoring step leaves it, on a pool of 3 real shards read by pruner's reader: a.tar
    (4 samples, 2 classes), b.tar (3 samples, all rejected for an empty caption, so an empty score file that names
    no URL) and c.tar (2 samples). Score files hold uid, key, shard_url, row and a score; config.yaml the pool."""
    pool = [str(write_shard(root / "pool" / "a.tar", [variant(sample(f"a-{i}"), json={"classname": "xy"[i % 2]})
                                                      for i in range(4)])),
            str(write_shard(root / "pool" / "b.tar", [sample(f"b-{i}", caption=" ") for i in range(3)])),
            str(write_shard(root / "pool" / "c.tar", [variant(sample(f"c-{i}"), json={"classname": "x"})
                                                      for i in range(2)]))]
    layout = JobLayout(root / "job")
    layout.shards_dir.mkdir(parents=True)
    for url in pool:
        samples, rejects = read_shard(url)
        t = pa.table({"uid": pa.array([x.uid for x in samples], pa.string()),
                      "key": pa.array([x.key for x in samples], pa.string()),
                      "shard_url": pa.array([url] * len(samples), pa.string()),
                      "row": pa.array(range(len(samples)), pa.int32())})
        if samples:  # the scorer writes no score column for a shard without samples
            t = t.append_column("diffin_target", pa.array([float(i) for i in range(len(samples))]))
        pq.write_table(t, layout.scores(url))
        rejects.write(layout.rejects(url))
    cfg = load_config(data={"data": {"shards": [str(root / "pool")]}, "target": {"shards": [pool[0]]},
                            "trajectory": {"checkpoints": ["c.pt"]},
                            "select": {"filter_score": None}}, check_paths=False)  # these files hold one score
    layout.config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return layout, pool


@pytest.mark.parametrize("select_cfg", [{"keep_fraction": 0.5}, {"keep_fraction": 0.5, "policy": "class_balanced"}])
def test_manifest_lists_every_pool_shard(tmp_path, select_cfg):
    """A shard whose samples were all rejected is in the manifest with no key (whichever policy selects), so the
    webdataset filter streams the whole original pool."""
    layout, pool = _scored_job(tmp_path)
    cfg = load_config(layout.config, [f"select.{k}={v}" for k, v in select_cfg.items()], check_paths=False)
    summary = finalize(cfg, layout, pool, {})
    manifest = json.loads((layout.keep_dir / "manifest.json").read_text())
    assert sorted(manifest) == sorted(pool) and manifest[pool[1]] == []
    assert summary["manifests"]["n_shards"] == 3 and summary["counts"]["rejected"] == 3
    kept = sorted(k for keys in manifest.values() for k in keys)
    assert len(kept) == summary["counts"]["kept"] == 3
    ds = wds.WebDataset(pool, shardshuffle=False).select(kept_keys_filter(layout.keep_dir / "manifest.json"))
    assert sorted(s["__key__"] for s in ds) == kept
    assert materialize(layout.keep_dir / "manifest.json", tmp_path / "out")["samples"] == 3
    if cfg.select.uses_policy:  # the same set written by the policy outside the job (pool from config.yaml)
        alone = select_policy(layout.root, "class_balanced", keep_fraction=0.5, keep_dir=tmp_path / "alone")
        assert json.loads((tmp_path / "alone" / "manifest.json").read_text()) == manifest
        assert alone["manifests"]["n_shards"] == 3


def test_materialize_never_repeats_a_key_in_an_output_shard(job, tmp_path):
    """Key 000000 of shard a, then 000001 of a, then 000000 of b: not back to back, yet b's 000000 must go to a new
    output shard, or pruner's reader would reject it as a duplicate key."""
    a, b = job["urls"][:2]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({a: ["000000", "000001"], b: ["000000"]}))
    res = materialize(manifest, tmp_path / "out", samples_per_shard=10)
    assert res["shards"] == 2 and res["samples"] == 3
    captions = []
    for shard in sorted((tmp_path / "out").glob("pruned-*.tar")):
        samples, rejects = read_shard(str(shard))
        assert not len(rejects), rejects.records
        captions += [(s.key, s.caption) for s in samples]
    assert captions == [("000000", "caption 0 0"), ("000001", "caption 0 1"), ("000000", "caption 1 0")]
    assert verify_materialized(manifest, tmp_path / "out") == {"shards": 2, "samples": 3}


def test_update_json_atomic_sets_keys_and_keeps_the_others(tmp_path):
    """The results-file merge the benchmarks share: a missing file is created, later updates replace only their own
    keys, and no temporary file is left beside it."""
    from pruner.io.atomic import update_json_atomic
    path = tmp_path / "results.json"
    update_json_atomic(path, {"a": 1, "b": {"x": 2}})
    update_json_atomic(path, {"b": 3, "c": [4]})
    assert json.loads(path.read_text()) == {"a": 1, "b": 3, "c": [4]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _dup_job(root) -> tuple[JobLayout, list[str]]:
    """A scored job whose lake was merged from two sources: b.tar carries a sample with the json uid of a sample of
    a.tar (and a higher score, so both copies would be kept), and c.tar repeats one of b.tar's uids."""
    a = [variant(sample(f"a-{i}", uid=f"uid-{i}"), json={"uid": f"uid-{i}", "classname": "xy"[i % 2]})
         for i in range(4)]
    b = [variant(sample("b-0", uid="uid-1"), json={"uid": "uid-1", "classname": "x"}),
         variant(sample("b-1", uid="uid-b1"), json={"uid": "uid-b1", "classname": "y"}),
         variant(sample("b-2", uid="uid-c0"), json={"uid": "uid-c0", "classname": "x"})]
    c = [variant(sample(f"c-{i}", uid=f"uid-c{i}"), json={"uid": f"uid-c{i}", "classname": "y"}) for i in range(2)]
    pool = [str(write_shard(root / "pool" / f"{n}.tar", s)) for n, s in (("a", a), ("b", b), ("c", c))]
    layout = JobLayout(root / "job")
    layout.shards_dir.mkdir(parents=True)
    for j, url in enumerate(pool):
        samples, rejects = read_shard(url)
        pq.write_table(pa.table({"uid": pa.array([x.uid for x in samples], pa.string()),
                                 "key": pa.array([x.key for x in samples], pa.string()),
                                 "shard_url": pa.array([url] * len(samples), pa.string()),
                                 "row": pa.array(range(len(samples)), pa.int32()),
                                 "diffin_target": pa.array([10.0 * j + i for i in range(len(samples))])}),
                       layout.scores(url))
        rejects.write(layout.rejects(url))
    cfg = load_config(data={"data": {"shards": [str(root / "pool")]}, "target": {"shards": [pool[0]]},
                            "trajectory": {"checkpoints": ["c.pt"]},
                            "select": {"filter_score": None}}, check_paths=False)  # these files hold one score
    layout.config.write_bytes(cfg.to_yaml())
    return layout, pool


@pytest.mark.parametrize("policy", ["top_k", "class_balanced"])
def test_duplicate_uid_first_in_sorted_shard_order_wins(tmp_path, policy):
    """Two samples with one uid: the one of the shard sorting first is ranked, the later one is a reject
    duplicate_uid naming both locations, counted once, never kept; the keep set writes without a collision."""
    layout, pool = _dup_job(tmp_path)
    cfg = load_config(layout.config, ["select.keep_fraction=1.0", f"select.policy={policy}"], check_paths=False)
    summary = finalize(cfg, layout, pool, {})
    assert summary["counts"]["samples"] == 7 and summary["counts"]["kept"] == 7  # 9 samples, 2 later copies
    assert summary["rejects_by_reason"] == {"duplicate_uid": 2}
    ranking = pq.read_table(layout.ranking).to_pydict()
    assert len(ranking["uid"]) == 7 and len(set(ranking["uid"])) == 7
    assert ("uid-1", pool[0]) in set(zip(ranking["uid"], ranking["shard_url"]))  # a's copy, not b's higher-scored one
    dups = pq.read_table(layout.root / "duplicates.parquet").to_pylist()
    assert sorted((d["uid"], d["url"], d["key"], d["kept_url"], d["kept_key"]) for d in dups) == [
        ("uid-1", pool[1], "b-0", pool[0], "a-1"), ("uid-c0", pool[2], "c-0", pool[1], "b-2")]
    manifest = json.loads((layout.keep_dir / "manifest.json").read_text())
    assert manifest[pool[1]] == ["b-1", "b-2"] and manifest[pool[2]] == ["c-1"]
    assert len(np.load(layout.keep_dir / "uids.npy")) == 7
    assert not (layout.root / ".reduce").exists()


def test_reduce_is_all_or_nothing(tmp_path):
    """A selection that fails while its keep set is written (two kept uids that are one DataComp uid: the same hex
    digits in upper and lower case) replaces nothing: the earlier ranking, keep set, config.yaml and summary stay."""
    layout, pool = _dup_job(tmp_path)
    url = pool[2]
    t = pq.read_table(layout.scores(url))
    hexes = ["0123456789abcdef0123456789abcdef", "0123456789ABCDEF0123456789ABCDEF"]
    t = t.set_column(0, "uid", pa.array(hexes, pa.string()))
    pq.write_table(t.set_column(t.schema.get_field_index("diffin_target"), "diffin_target", pa.array([-1.0, -2.0])),
                   layout.scores(url))  # ranked last: a 50% selection keeps neither
    cfg = load_config(layout.config, ["select.keep_fraction=0.5"], check_paths=False)
    finalize(cfg, layout, pool, {})
    before = {p.relative_to(layout.root): p.read_bytes() for p in layout.root.rglob("*") if p.is_file()
              and p.parent != layout.shards_dir}
    cfg = load_config(layout.config, ["select.keep_fraction=1.0"], check_paths=False)
    with pytest.raises(ValueError, match="collide"):
        finalize(cfg, layout, pool, {})
    after = {p.relative_to(layout.root): p.read_bytes() for p in layout.root.rglob("*") if p.is_file()
             and p.parent != layout.shards_dir}
    assert after == before


def test_unsafe_member_names_are_rejected_and_never_written(tmp_path):
    """A member named ../../evil.jpg (or with a folder, a backslash, a control character) is a reject unsafe_key;
    materialize refuses to write such a name even when a manifest asks for it."""
    bad = ["../../evil", "/abs/x", "dir\\x", "ctl\x01x", "dir/x"]
    url = str(write_shard(tmp_path / "s.tar", [sample("good")] + [sample(k) for k in bad]))
    samples, rejects = read_shard(url)
    assert [s.key for s in samples] == ["good"]
    assert sorted(r["key"] for r in rejects.records) == sorted(bad)
    assert {r["reason"] for r in rejects.records} == {"unsafe_key"}
    assert "not a safe file name" in rejects.records[0]["detail"]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({url: ["good", "../../evil"]}))
    with pytest.raises(MaterializeError, match="not a safe file name"):
        materialize(manifest, tmp_path / "out")
    assert not list(tmp_path.rglob("evil*")) and not (tmp_path.parent / "evil.jpg").exists()


def test_materialize_writes_the_conventions_downstream_tools_read(job, tmp_path):
    """naming="datacomp": 00000000.tar, ... as DataComp's resharder and img2dataset name shards; beside each, an
    img2dataset-style _stats.json whose "successes" is the shard's size (what the resharder reads) and a parquet of
    key, uid, url, caption, status, error_message and source shard in tar order; sizes.json is the shard table
    OpenCLIP's data loader sizes an epoch by (its own get_dataset_size reads it here)."""
    from open_clip_train.data import get_dataset_size

    from pruner.io.manifests import SHARD_TABLE_SCHEMA
    manifest = job["layout"].keep_dir / "manifest.json"
    (tmp_path / "00000009.tar").write_bytes(b"stale")  # an earlier, longer run's output: removed
    res = materialize(manifest, tmp_path, samples_per_shard=5, naming="datacomp")
    tars = sorted(tmp_path.glob("*.tar"))
    assert [p.name for p in tars] == [f"{i:08d}.tar" for i in range(res["shards"])] and res["samples"] == 18
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {p.name: len(pq.read_table(p.with_suffix(".parquet"))) for p in tars}
    assert get_dataset_size(str(tmp_path / f"{{00000000..{res['shards'] - 1:08d}}}.tar")) == (18, res["shards"])
    truth = {(url, key): uid for (url, key), (uid, _, _) in job["truth"].items()}
    for p in tars:
        stats = json.loads(p.with_name(p.stem + "_stats.json").read_text())
        table = pq.read_table(p.with_suffix(".parquet"))
        assert table.schema.equals(SHARD_TABLE_SCHEMA)
        with tarfile.open(p) as tf:
            keys = list(dict.fromkeys(m.name.split(".")[0] for m in tf.getmembers()))
        assert table["key"].to_pylist() == keys and stats["successes"] == stats["count"] == len(keys)
        for row in table.to_pylist():
            assert row["uid"] == truth[row["source_shard"], row["key"]] and row["status"] == "success"
            assert row["caption"].startswith("caption ")
    assert verify_materialized(manifest, tmp_path, "datacomp") == {"shards": res["shards"], "samples": 18}
    sizes[tars[0].name] += 1
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    with pytest.raises(MaterializeError, match="00000000.tar holds .* samples, but"):
        verify_materialized(manifest, tmp_path, "datacomp")


def test_filter_stage_sets_apart_the_lowest_then_ranks_the_rest(tmp_path):
    """The default pipeline's shape (select.filter_score): the 30% lowest by the filter column are set apart, the
    budget is the best of the rest by select.score, and the ranking's order is the pipeline's (select_score: the set
    apart ones last, by the filter score); summary.json and ranking.parquet's metadata say so."""
    layout, pool = _dup_job(tmp_path)
    for url in pool:  # a filter column: the reverse of the score, so the filter and the score disagree
        t = pq.read_table(layout.scores(url))
        pq.write_table(t.append_column("baseline_clip_score", pa.array(-t["diffin_target"].to_numpy())),
                       layout.scores(url))
    cfg = load_config(layout.config, ["select.keep_fraction=0.4", "select.filter_score=baseline_clip_score",
                                      "select.filter_fraction=0.3"], check_paths=False)
    summary = finalize(cfg, layout, pool, {})
    ranking = pq.read_table(layout.ranking)
    rows = ranking.to_pylist()
    # 7 samples (2 duplicates out): floor(0.7 * 7) = 4 pass the filter, the ones with the lowest diffin_target
    passed = sorted(rows, key=lambda r: r["diffin_target"])[:4]
    kept = sorted(passed, key=lambda r: -r["diffin_target"])[:2]  # floor(0.4 * 7) = 2
    assert {r["uid"] for r in rows if r["kept"]} == {r["uid"] for r in kept}
    assert [r["uid"] for r in rows][:4] == [r["uid"] for r in sorted(passed, key=lambda r: -r["diffin_target"])]
    apart = rows[4:]
    assert [r["baseline_clip_score"] for r in apart] == sorted((r["baseline_clip_score"] for r in apart), reverse=True)
    assert max(r["select_score"] for r in apart) < min(r["select_score"] for r in rows[:4])
    assert summary["stages"][0] == {"stage": "filter", "score": "baseline_clip_score", "fraction": 0.3,
                                    "cutoff": summary["stages"][0]["cutoff"], "passed": 4, "set_apart": 3}
    assert summary["stages"][1]["kept"] == 2 and summary["counts"]["kept"] == 2
    meta = ranking.schema.metadata
    assert meta[b"pruner.ranked_by"] == b"select_score" and meta[b"pruner.job"] == layout.root.name.encode()
    assert json.loads(meta[b"pruner.select"])["filter_score"] == "baseline_clip_score"
    assert len(json.loads((layout.keep_dir / "manifest.json").read_text())) == 3


def test_fallback_uids_are_warned_about(tmp_path):
    """Kept samples without a DataComp-style json uid get a warning in summary.json (printed by `pruner prune` and
    shown by the report) saying what keep/uids.npy cannot do and what to use instead; hex uids get none."""
    layout, pool = _scored_job(tmp_path / "a")  # the corpus samples carry no json uid: fallback uids
    cfg = load_config(layout.config, ["select.keep_fraction=1.0"], check_paths=False)
    summary = finalize(cfg, layout, pool, {})
    (w,) = summary["warnings"]
    assert w.startswith("6 of the 6 kept samples have no DataComp-style json uid") and "would write none" in w
    assert "keep/manifest.json" in w and "keep/keep.parquet" in w
    layout, pool = _dup_job(tmp_path / "b")  # uids like "uid-1": not hex either
    assert finalize(load_config(layout.config, check_paths=False), layout, pool, {})["warnings"]
    hexed = tmp_path / "c"
    layout, pool = _dup_job(hexed)
    for url in pool:
        t = pq.read_table(layout.scores(url))
        hexes = [hashlib.md5(u.encode()).hexdigest() for u in t["uid"].to_pylist()]
        pq.write_table(t.set_column(0, "uid", pa.array(hexes, pa.string())), layout.scores(url))
    assert finalize(load_config(layout.config, check_paths=False), layout, pool, {})["warnings"] == []
