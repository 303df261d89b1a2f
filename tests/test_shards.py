"""Shard listing and reading (pruner.io.shards) on built shards, a bad-shard corpus, the demo data and real data."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from corpus import image_bytes, make_bad_corpus, make_good_shard, sample, write_shard

from pruner.io.shards import (DEMO_DIR, REJECT_REASONS, RejectLog, check_shard_names, demo_pool_shards,
                              demo_target_shards, expand_shard_specs, iter_shard, read_shard)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_bad_corpus(tmp_path_factory.mktemp("bad"))


@pytest.fixture()
def shard_dir(tmp_path):
    for i in range(3):
        make_good_shard(tmp_path / f"shard-{i:06d}.tar", prefix=f"s{i}")
    make_good_shard(tmp_path / "extra.tar.gz", prefix="x")
    make_good_shard(tmp_path / "extra.tgz", prefix="y")
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    make_good_shard(tmp_path / "sub" / "nested.tar")
    return tmp_path


# ---------------------------------------------------------------- listing

def test_expand_directory_lists_shards_non_recursively(shard_dir):
    names = [Path(p).name for p in expand_shard_specs([str(shard_dir)])]
    assert names == ["extra.tar.gz", "extra.tgz", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_expand_glob_brace_and_dedup(shard_dir):
    glob = expand_shard_specs([f"{shard_dir}/shard-*.tar"])
    brace = expand_shard_specs([f"{shard_dir}/shard-{{000000..000002}}.tar"])
    assert glob == brace == [str(shard_dir / f"shard-{i:06d}.tar") for i in range(3)]
    both = expand_shard_specs([f"{shard_dir}/shard-000001.tar", f"{shard_dir}/shard-*.tar", str(shard_dir)])
    assert both == sorted(set(both)) and len(both) == 5


def test_expand_file_url_keeps_protocol(shard_dir):
    assert expand_shard_specs([f"file://{shard_dir}/shard-*.tar"]) == [
        f"file://{shard_dir}/shard-{i:06d}.tar" for i in range(3)]
    assert expand_shard_specs([f"file://{shard_dir}"])[0] == f"file://{shard_dir}/extra.tar.gz"


@pytest.mark.parametrize("spec", ["{d}/nothing-*.tar", "{d}/missing.tar", "{d}/shard-{{000002..000003}}.tar",
                                  "{d}/sub/nested.tar/x-*.tar"])
def test_expand_missing_raises_naming_spec(shard_dir, spec):
    spec = spec.format(d=shard_dir)
    with pytest.raises(ValueError) as e:
        expand_shard_specs([spec])
    assert spec in str(e.value)


def test_expand_refuses_pipe_unless_allowed():
    with pytest.raises(ValueError, match=r"pipe:cat x\.tar.*data\.allow_pipe: true"):
        expand_shard_specs(["pipe:cat x.tar"])
    assert expand_shard_specs(["pipe:cat x.tar"], allow_pipe=True) == ["pipe:cat x.tar"]


# ---------------------------------------------------------------- reading good shards

@pytest.mark.parametrize("name", ["good.tar", "good.tar.gz"])
def test_read_tar_and_tgz(tmp_path, name):
    path = str(make_good_shard(tmp_path / name, n=4, prefix="g"))
    samples, rejects = read_shard(path)
    assert len(rejects) == 0
    assert [s.key for s in samples] == ["g-000", "g-001", "g-002", "g-003"]
    s0, s1 = samples[:2]
    assert s0.url == path and s0.caption == "a photo of g-000" and s0.image.mode == "RGB"
    assert s0.image.size == (16, 16) and s0.meta == {"source": "g-000", "uid": "g-uid-000"}
    assert s0.uid == "g-uid-000"                       # from json["uid"]
    assert s1.uid == f"{tmp_path.name}/{name}/g-001"   # no uid in json: <parent folder>/<shard file>/<key>


def test_file_url_pipe_and_max_samples(tmp_path):
    path = make_good_shard(tmp_path / "good.tar.gz", n=5)
    direct = [s.key for s in read_shard(str(path))[0]]
    assert [s.key for s in read_shard(f"file://{path}")[0]] == direct
    assert [s.key for s in read_shard(f"pipe:cat {path}", allow_pipe=True)[0]] == direct
    assert [s.key for s in read_shard(str(path), max_samples=2)[0]] == direct[:2]
    assert [s.key for s in read_shard(f"pipe:cat {path}", allow_pipe=True, max_samples=1)[0]] == direct[:1]


def test_formats_and_caption_cleanup(tmp_path):
    path = write_shard(tmp_path / "fmt.tar", [
        sample("a", fmt="png", caption="  padded caption \n"), sample("b", fmt="webp"), sample("c", fmt="jpeg"),
        ("d", {"PNG": image_bytes("png", mode="RGBA"), "txt": "rgba", "cls": b"3"}),
        ("e", {"jpg": image_bytes(), "txt": "uid from json", "json": {"uid": 17}}),
        ("f", {"seg.jpg": image_bytes(), "txt": "ext is seg.jpg, not jpg"}),
        ("dir/g", {"jpg": image_bytes(), "txt": "a folder in the key: not a plain file name"})])
    samples, rejects = read_shard(str(path))
    assert [s.key for s in samples] == ["a", "b", "c", "d", "e"]
    assert samples[0].caption == "padded caption"
    assert all(s.image.mode == "RGB" for s in samples)
    assert samples[4].uid == "17"
    assert rejects.counts() == {"missing_image": 1, "unsafe_key": 1}
    assert [(r["key"], r["reason"]) for r in rejects.records] == [("f", "missing_image"), ("dir/g", "unsafe_key")]


# ---------------------------------------------------------------- bad corpus

EXPECTED = {  # case: (keys kept in order, reject counts)
    "truncated_tar": (["t-000", "t-001"], {"truncated_tar": 1}),
    "truncated_tgz": (["t-000", "t-001"], {"truncated_tar": 1}),
    "not_a_tar": ([], {"unreadable_shard": 1}),
    "not_image": (["ni-000", "ni-002"], {"undecodable_image": 2}),
    "empty_caption": (["ec-000"], {"empty_caption": 2}),
    "non_utf8_caption": (["nu-000", "nu-002"], {"non_utf8_caption": 1}),
    "duplicate_key": (["dk-000", "dk-001", "dk-002"], {"duplicate_key": 2}),
    "missing_json": (["mj-000", "mj-001"], {}),
    "missing_txt": (["mt-000"], {"missing_caption": 1}),
    "missing_image": (["mi-000"], {"missing_image": 1}),
    "bad_json": (["bj-000"], {"bad_json": 2}),
    "non_utf8_name": (["nn-000", "nn-002"], {"non_utf8_name": 1}),
    "unsafe_key": (["uk-000", "uk-003"], {"unsafe_key": 2}),
    "mixed": (["mx-000", "mx-007"], {r: 1 for r in ("undecodable_image", "empty_caption", "non_utf8_caption",
                                                    "missing_caption", "missing_image", "bad_json",
                                                    "duplicate_key")}),
}


def test_corpus_covers_every_case(corpus):
    assert set(corpus) == set(EXPECTED) | {"pipe"}
    # duplicate_uid is the reduce step's (a uid repeated across shards: tests/test_manifests.py)
    assert {r for _, c in EXPECTED.values() for r in c} == set(REJECT_REASONS) - {"duplicate_uid"}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_corpus_exact(corpus, case):
    keys, counts = EXPECTED[case]
    samples, rejects = read_shard(corpus[case])
    assert [s.key for s in samples] == keys
    assert rejects.counts() == counts
    assert all(r["url"] == corpus[case] for r in rejects.records)


def test_reject_details_name_member_and_fix(corpus):
    _, rejects = read_shard(corpus["mixed"])
    by_key = {r["key"]: r for r in rejects.records}
    assert "mx-001.jpg" in by_key["mx-001"]["detail"]
    assert "mx-002.txt" in by_key["mx-002"]["detail"]
    assert "mx-003.txt" in by_key["mx-003"]["detail"]
    assert "mx-004.jpg" in by_key["mx-004"]["detail"]    # lists the members that are there
    assert "mx-006.json" in by_key["mx-006"]["detail"]
    assert "mx-000.jpg" in by_key["mx-000"]["detail"] and "first occurrence is kept" in by_key["mx-000"]["detail"]
    assert all(corpus["mixed"] in r["detail"] and "fix:" in r["detail"] for r in rejects.records)


def test_non_utf8_name_is_recorded_readably(corpus, tmp_path):
    """The rejected key and detail are valid UTF-8 (a Parquet rejects file holds them), naming the member."""
    _, rejects = read_shard(corpus["non_utf8_name"])
    (rec,) = rejects.records
    assert rec["key"] == "caf\\xe9-001" and "caf\\xe9-001.jpg" in rec["detail"] and "fix:" in rec["detail"]
    rejects.write(tmp_path / "rejects.parquet")
    assert RejectLog.read(tmp_path / "rejects.parquet").records == rejects.records


def test_truncated_and_unreadable_details(corpus, tmp_path):
    (rec,) = read_shard(corpus["truncated_tar"])[1].records
    assert rec["key"] == "" and corpus["truncated_tar"] in rec["detail"]
    assert "after 2 complete samples" in rec["detail"] and "'t-002' was dropped" in rec["detail"]
    missing = str(tmp_path / "gone.tar")
    samples, rejects = read_shard(missing)
    assert samples == [] and rejects.counts() == {"unreadable_shard": 1}
    assert missing in rejects.records[0]["detail"]


def test_duplicates_keep_first_and_missing_json_uid(corpus):
    samples = read_shard(corpus["duplicate_key"])[0]
    assert "second copy" not in {s.caption for s in samples}
    mj = read_shard(corpus["missing_json"])[0][1]
    assert mj.meta == {} and mj.uid == f"{Path(corpus['missing_json']).parent.name}/missing_json.tar/mj-001"


def test_same_named_shards_in_two_folders(tmp_path):
    """Partitioned lakes repeat shard file names across folders: the parent folder keeps fallback uids apart, and a
    pool whose shards share folder and file name is refused, naming both."""
    a = make_good_shard(tmp_path / "2024" / "00000.tar", prefix="g")
    b = make_good_shard(tmp_path / "2025" / "00000.tar", prefix="g")
    ua, ub = (read_shard(str(p))[0][1].uid for p in (a, b))
    assert (ua, ub) == ("2024/00000.tar/g-001", "2025/00000.tar/g-001")
    check_shard_names(expand_shard_specs([str(tmp_path / "*" / "*.tar")]))
    c = make_good_shard(tmp_path / "x" / "2024" / "00000.tar", prefix="g")
    with pytest.raises(ValueError, match=f"{a}.*{c}|{c}.*{a}") as e:
        check_shard_names(expand_shard_specs([str(tmp_path / "*" / "*.tar"), str(tmp_path / "x" / "*" / "*.tar")]))
    assert "fix:" in str(e.value)


def test_pipe_refused_by_default_allowed_when_set(corpus):
    with pytest.raises(ValueError, match="allow_pipe"):
        read_shard(corpus["pipe"])
    samples, rejects = read_shard(corpus["pipe"], allow_pipe=True)
    assert [s.key for s in samples] == ["p-000", "p-001", "p-002", "p-003"] and len(rejects) == 0
    assert samples[0].uid == "p-uid-000" and samples[1].uid.endswith("/pipe_source.tar/p-001")
    _, rejects = read_shard("pipe:cat /nonexistent/shard.tar", allow_pipe=True)
    assert rejects.counts() == {"unreadable_shard": 1}


# ---------------------------------------------------------------- RejectLog

def test_reject_log_parquet_round_trip_and_merge(corpus, tmp_path):
    log = RejectLog()
    for case in ("mixed", "truncated_tar", "not_a_tar"):
        log.merge(read_shard(corpus[case])[1])
    assert len(log) == 9 and log.to_table().column_names == ["url", "key", "reason", "detail"]
    path = tmp_path / "out" / "rejects.parquet"
    log.write(path)
    back = RejectLog.read(path)
    assert back.records == log.records and back.counts() == log.counts()
    RejectLog().write(tmp_path / "empty.parquet")
    assert len(RejectLog.read(tmp_path / "empty.parquet")) == 0
    with pytest.raises(ValueError, match="unknown reject reason"):
        log.add("u", "k", "bad_vibes", "")


def test_iter_shard_streams_into_given_log(corpus):
    log = RejectLog()
    it = iter_shard(corpus["mixed"], log)
    assert next(it).key == "mx-000" and len(log) == 0   # nothing read past the first sample yet
    assert [s.key for s in it] == ["mx-007"] and len(log) == 7


# ---------------------------------------------------------------- bundled demo and real data

def test_demo_shards():
    pool, target = demo_pool_shards(), demo_target_shards()
    assert [Path(p).name for p in pool] == [f"demo-pool-{i:06d}.tar.gz" for i in range(4)]
    assert [Path(p).name for p in target] == ["demo-target-000000.tar.gz"]
    assert sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file()) <= 5 * 2**20
    labels = Counter()
    for url in pool:
        samples, rejects = read_shard(url)
        assert len(samples) == 250 and len(rejects) == 0
        assert Counter(s.meta["label"] for s in samples) == {c: 25 for c in range(10)}
        labels.update(s.meta["split"] for s in samples)
    assert labels == {"train": 1000}
    samples, rejects = read_shard(target[0])
    assert len(samples) == 200 and len(rejects) == 0
    assert Counter(s.meta["label"] for s in samples) == {c: 20 for c in range(10)}
    assert {s.meta["split"] for s in samples} == {"test"}
    s = samples[0]
    # DataComp-style json uids (32 lowercase hex digits, md5 of the key: pruner.demo.make_demo.demo_uid)
    assert s.image.size == (32, 32) and s.uid == hashlib.md5(s.key.encode()).hexdigest()
    names = json.loads((DEMO_DIR / "classnames.json").read_text())["classnames"]
    assert s.meta["classname"] == names[s.meta["label"]]


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
def test_real_shared_shard():
    (url,) = expand_shard_specs([str(SHARED / "test" / "cifar10-test-000004.tar.gz")])
    samples, rejects = read_shard(url)
    assert len(samples) == 2000 and len(rejects) == 0
    s = samples[0]
    assert s.key.startswith("c10-test-") and s.caption == s.meta["caption"] and s.image.size == (32, 32)


def test_shared_input_picks_match_sorting_the_head(tmp_path):
    """pick_shared_inputs reads every pick in one pass with bounded heaps: each pick equals the brute-force choice
    (sort the first `head` accepted samples of the pool, in sorted shard order, by sha1(name:uid), ties by position),
    and the target is the first max_samples target samples."""
    from conftest import small_job_config
    from pruner.config import JobConfig
    from pruner.scorer import iter_pool, pick_curvature_samples, pick_shared_inputs
    raw = small_job_config(tmp_path, tmp_path / "trajectory.json",
                           features={"bank_size": 100}, scores={"diffin": {"reference_batch_size": 30,
                                                                          "reference_batches": 2,
                                                                          "curvature_samples": 150},
                                                                "oga": {"iforest_sample": 300}})
    cfg = JobConfig.model_validate(raw)
    pool = list(reversed(demo_pool_shards()))  # listed in any order: read in sorted order
    uids = [s.uid for s in iter_pool(pool)]

    def brute(name, n, head):
        order = sorted(range(min(head, len(uids))),
                       key=lambda i: (hashlib.sha1(f"{name}:{uids[i]}".encode()).hexdigest(), i))
        return [uids[i] for i in order[:n]]

    got = pick_shared_inputs(cfg, pool, demo_target_shards(), curvature=True, oga=True)
    assert [s.uid for s in got.bank] == brute("bank", 100, 400)
    assert [s.uid for batch in got.reference for s in batch] == \
        [u for i in range(2) for u in brute("reference", 60, 400)[i::2]]
    assert [s.uid for s in got.curvature] == brute("curvature", 150, 600)
    assert [s.uid for s in got.oga] == brute("oga", 300, 300)
    assert [s.uid for s in got.target] == [s.uid for s in iter_pool(demo_target_shards())][:64]
    assert [s.uid for s in pick_curvature_samples(cfg, pool)] == brute("curvature", 150, 600)
    plain = pick_shared_inputs(cfg, pool, demo_target_shards())
    assert plain.curvature is None and plain.oga is None and [s.uid for s in plain.bank] == [s.uid for s in got.bank]
