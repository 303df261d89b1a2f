"""pruner.report.html on a real finished job (two demo shards plus a shard with planted bad samples), checked
against the job's own files read independently, then rendered in headless Chromium."""
from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageStat
from scipy.stats import spearmanr

from pruner.cli.cluster import main as cluster_main
from pruner.cli.explain import main as explain_main
from pruner.cli.report import main
from pruner.config import load_config
from pruner.io.layout import JobLayout
from pruner.io.shards import demo_pool_shards
from pruner.report.html import _cards, _fmt, attach_images, build_report, read_extremes, read_sample, spearman
from pruner.select.reduce import finalize
from tests.conftest import copy_job, small_job_config

TOP = 6
BAD = {"bad-nocaption": {"jpg": None, "json": b"{}"},                 # missing_caption
       "bad-image": {"jpg": b"not a jpeg", "txt": b"a broken image"},  # undecodable_image
       "bad-empty": {"jpg": None, "txt": b"   "}}                      # empty_caption


def _extra_shard(path: Path, source: str, n_good: int = 20) -> None:
    """A tar with the first n_good samples of ``source`` under new keys ``x-<key>``, then the BAD samples."""
    members, keys = [], []
    with tarfile.open(source, "r:gz") as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if key not in keys and len(keys) == n_good:
                break
            keys += [key] if key not in keys else []
            members.append((f"x-{key}.{ext}", tf.extractfile(m).read()))
    good_jpg = next(data for name, data in members if name.endswith(".jpg"))
    for key, parts in BAD.items():
        members += [(f"{key}.{ext}", good_jpg if data is None else data) for ext, data in parts.items()]
    with tarfile.open(path, "w") as out:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            out.addfile(info, io.BytesIO(data))


def finished_job(tmp_path_factory, trajectory: Path) -> Path:
    """The directory of a real finished job, built once per test session (also used by tests/test_notebook.py)."""
    base = tmp_path_factory.getbasetemp() / "finished-job"
    record = base / "job_dir.txt"
    if record.exists():
        return Path(record.read_text())
    from pruner.jobs.prune import run

    extra = base / "extra" / "extra-000000.tar"
    extra.parent.mkdir(parents=True)
    pool = demo_pool_shards()[:2]
    _extra_shard(extra, demo_pool_shards()[2])
    cfg = small_job_config(base, trajectory, data={"shards": pool + [str(extra)]})
    status, summary = run(load_config(data=cfg))
    assert status == 0
    root = Path(cfg["output_dir"]) / summary["job"]
    record.write_text(str(root))
    return root


def policy_job(tmp_path_factory, trajectory: Path) -> Path:
    """A copy of :func:`finished_job` reduced again with ``select.policy: class_balanced`` (summary.json
    ``selection`` null, the keep set the policy's), built once per test session (also used by
    tests/test_notebook.py)."""
    base = tmp_path_factory.getbasetemp() / "policy-job"
    record = base / "job_dir.txt"
    if record.exists():
        return Path(record.read_text())
    root, cfg, shards = copy_job(finished_job(tmp_path_factory, trajectory), base, ["select.policy=class_balanced"])
    summary = finalize(cfg, JobLayout(root), shards, {})
    assert summary["selection"] is None and summary["policy"]["policy"] == "class_balanced"
    record.write_text(str(root))
    return root


@pytest.fixture(scope="module")
def job(tmp_path_factory, micro_trajectory) -> Path:
    return finished_job(tmp_path_factory, micro_trajectory)


@pytest.fixture(scope="module")
def report(job, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main([str(job), "--out", str(out), "--top", str(TOP)]) == 0
    return out, out.read_text()


@pytest.fixture(scope="module")
def explained(job, tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of the job after `pruner explain` of a pair and of a pool sample (twice) and `pruner cluster`, its
    report written with --top TOP)."""
    tmp = tmp_path_factory.mktemp("explained")
    root, _, _ = copy_job(job, tmp, [])
    with tarfile.open(demo_pool_shards()[1], "r:gz") as tf:  # a pair from the pool, as a user's file
        key = tf.getmembers()[0].name.split(".")[0]
        (tmp / "query.jpg").write_bytes(tf.extractfile(f"{key}.jpg").read())
        caption = tf.extractfile(f"{key}.txt").read().decode()
    assert explain_main([str(root), "--image", str(tmp / "query.jpg"), "--caption", caption, "-k", "3",
                         "--device", "cpu"]) == 0
    uid = pq.read_table(root / "ranking.parquet", columns=["uid"])["uid"][7].as_py()
    for _ in range(2):  # the same query again replaces its saved result
        assert explain_main([str(root), "--uid", uid, "-k", str(TOP + 2), "--out", str(tmp / "uid.json")]) == 0
    assert cluster_main([str(root), "--clusters", "3", "--typical", "2"]) == 0
    out = tmp / "report.html"
    assert main([str(root), "--out", str(out), "--top", str(TOP)]) == 0
    return root, out


def _caption(url: str, key: str) -> str:
    with tarfile.open(url) as tf:
        return tf.extractfile(f"{key}.txt").read().decode().strip()


def _data_uri_image(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def _classnames(urls) -> dict[tuple[str, str], str]:
    """{(shard url, key): classname} read straight from the tars' .json members."""
    out = {}
    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read() or b"{}")
                    if "classname" in meta:
                        out[(url, m.name[: -len(".json")])] = meta["classname"]
    return out


def test_self_contained(report):
    _, doc = report
    assert "No saved result" in doc and "No <code>clusters.json</code>" in doc  # no pruner explain / cluster run
    assert doc.startswith("<!DOCTYPE html>") and doc.rstrip().endswith("</html>")
    assert "<script" not in doc and "<link" not in doc and "url(" not in doc
    assert all(src.startswith("data:image/") for src in re.findall(r'src="([^"]*)"', doc))


def test_summary_methods_and_correlations(report, job):
    _, doc = report
    summary = json.loads((job / "summary.json").read_text())
    assert summary["job"] in doc and f"<td>{summary['counts']['kept']}</td>" in doc
    methods = [c for c in pq.read_schema(job / "ranking.parquet").names if c.split("_")[0] in
               ("diffin", "tracin", "oga", "baseline")]
    assert len(methods) >= 10
    for m in methods:  # one histogram per method, one correlation row per method
        assert doc.count(f">{m}</text>") + doc.count(f">{m} (selection)</text>") == 1, m
        assert f'<th class="l">{m}</th>' in doc, m
    assert doc.count('<svg class="hist"') == len(methods)


def test_most_helpful_and_harmful_pairs_with_images(report, job):
    _, doc = report
    score = json.loads((job / "summary.json").read_text())["score"]
    ranking = pq.read_table(job / "ranking.parquet", columns=["key", "rank", score]).to_pylist()
    best, worst = ranking[:TOP], sorted(ranking, key=lambda r: r[score])[:TOP]
    assert doc.count('<div class="card">') == 2 * TOP and doc.count('src="data:image/jpeg;base64,') == 2 * TOP
    helpful, harmful = doc.split("Most harmful pairs")
    assert [r["key"] for r in best] == re.findall(r'alt="([^"]+)"', helpful)
    assert [r["key"] for r in worst] == re.findall(r'alt="([^"]+)"', harmful)
    assert f"rank {best[0]['rank']} ·" in helpful and f"rank {worst[0]['rank']} ·" in harmful


def test_images_of_overlapping_lists_and_a_key_in_two_shards(job, tmp_path):
    """Rows are matched by (shard URL, key): the same sample in both lists gets its image in each, a key that two
    shards hold gets each shard's own sample, a pipe: URL is not run."""
    pool = demo_pool_shards()[0]
    with tarfile.open(pool, "r:gz") as tf:
        names = [m.name for m in tf.getmembers()]
        key, other = names[0].split(".")[0], names[-1].split(".")[0]
        caption = tf.extractfile(f"{key}.txt").read().decode().strip()
        twin = {ext: tf.extractfile(f"{other}.{ext}").read() for ext in ("jpg", "txt")}
    copy = tmp_path / "twin.tar"  # `key` again, with another sample's image and caption
    with tarfile.open(copy, "w") as out:
        for ext, data in twin.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    rows = [{"shard_url": u, "key": key} for u in (pool, str(copy), pool, str(copy), f"pipe:cat {copy}")]
    attach_images(rows, convert=lambda im: im.tobytes())
    assert [r["caption"] for r in rows[:4]] == [caption, twin["txt"].decode().strip()] * 2
    assert rows[0]["image"] == rows[2]["image"] != rows[1]["image"] == rows[3]["image"]
    assert rows[4]["image"] is None and "pipe:" in rows[4]["note"]
    rows = [{"shard_url": f"pipe:cat {u}", "key": key} for u in (copy, pool)]
    attach_images(rows, convert=lambda im: im.tobytes(), pipes={f"pipe:cat {copy}"})  # one the job's config lists
    assert rows[0]["caption"] == twin["txt"].decode().strip() and rows[0]["image"] is not None
    assert rows[1]["image"] is None and "pipe:" in rows[1]["note"]  # any other command is not run
    # the report: more rows shown than half the ranking, so the helpful and harmful lists overlap
    n = pq.read_metadata(job / "ranking.parquet").num_rows
    top = n // 2 + 10
    doc = build_report(job, tmp_path / "report.html", top=top).read_text()
    assert doc.count('src="data:image/jpeg;base64,') == 2 * top and "not found in its shard" not in doc


def test_explain_results_and_clusters_in_the_report(explained, tmp_path):
    root, out = explained
    doc = out.read_text()
    saved = sorted((root / "explain" / "results").glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    assert [p.name.split("-")[0] for p in saved] == ["pool_sample", "pair"]  # one file per query, newest first
    results = [json.loads(p.read_text()) for p in saved]
    assert results[0] == json.loads((out.parent / "uid.json").read_text())  # --out holds the same result
    section = doc.split("<h2>Explained queries")[1].split("<h2>Gradient clusters")[0]
    assert f"Pool sample {results[0]['query']['uid']}" in section
    assert f"Pair: {html.escape(results[1]['query']['caption'])}" in section
    cards = re.findall(r'<div class="card">(?:<img alt="[^"]*" src="([^"]*)">|<div class="note">[^<]*</div>)'
                       r'<div class="cap">([^<]*)</div><div class="s">(.*?)</div></div>', section)
    expected = []  # per query, newest first: the query's card, then its first TOP proponents and opponents
    for r in results:
        q = r["query"]
        expected.append((q["caption"] if q["type"] == "pair" else _caption(q["shard_url"], q["key"]), "query"))
        expected += [(h["caption"], f'rank {h["rank"]} · TracIn {_fmt(h["score"])}<br>{h["uid"]}')
                     for h in r["proponents"][:TOP] + r["opponents"][:TOP]]
    assert [(html.unescape(c), info) for _, c, info in cards] == expected
    assert len(results[0]["proponents"]) == TOP + 2 and len(cards) == 1 + 2 * TOP + 1 + 2 * 3
    images = [_data_uri_image(src) for src, _, _ in cards]  # every card has a decodable thumbnail
    query = np.asarray(Image.open(root.parent / "query.jpg").convert("RGB"), float)
    assert np.abs(np.asarray(images[1 + 2 * TOP], float) - query).mean() < 8  # the pair's own image
    clusters = json.loads((root / "clusters.json").read_text())
    table = doc.split("<h2>Gradient clusters")[1].split("<h2>Rejected samples")[0]
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td>", table)
    assert sorted((int(c), int(n)) for c, n in rows) == sorted((c["cluster"], c["size"]) for c in clusters["clusters"])
    assert sum(int(n) for _, n in rows) == pq.read_metadata(root / "ranking.parquet").num_rows
    assert all(html.escape(t["caption"]) in table for c in clusters["clusters"] for t in c["typical"])


def test_rejects_by_reason(report, job):
    _, doc = report
    section = doc.split("<h2>Rejected samples</h2>")[1]
    for key, reason in zip(BAD, ("missing_caption", "undecodable_image", "empty_caption")):
        assert f'<td class="l">{reason}</td><td>1</td>' in section and f'<td class="l">{key}</td>' in section


def per_class_counts(job: Path) -> dict[str, list[int]]:
    """{classname: [kept, dropped]} of a job from its ranking's ``kept`` column and the tars' json members
    (also used by tests/test_notebook.py)."""
    t = pq.read_table(job / "ranking.parquet", columns=["shard_url", "key", "kept"]).to_pylist()
    names = _classnames({r["shard_url"] for r in t})
    expected = {}
    for r in t:
        expected.setdefault(names[(r["shard_url"], r["key"])], [0, 0])[0 if r["kept"] else 1] += 1
    assert len(expected) == 10
    return expected


def test_keep_drop_per_class(report, job):
    _, doc = report
    for name, (kept, dropped) in per_class_counts(job).items():
        assert f'<td class="l">{name}</td><td>{kept}</td><td>{dropped}</td>' in doc, name


def test_keep_drop_per_class_of_a_policy_job(tmp_path_factory, micro_trajectory, tmp_path):
    """A policy job (summary.json ``selection`` null): the split is the policy's keep set, not a top-k cut."""
    job = policy_job(tmp_path_factory, micro_trajectory)
    doc = build_report(job, tmp_path / "report.html", top=1).read_text()
    assert "policy=class_balanced" in doc
    expected = per_class_counts(job)
    keep = set(pq.read_table(job / "keep" / "keep.parquet", columns=["uid"])["uid"].to_pylist())
    assert sum(k for k, _ in expected.values()) == len(keep)
    # class_balanced keeps half of every class (keep_fraction 0.5, largest remainders), unlike this job's top-k
    assert all(abs(k - (k + d) / 2) <= 1 for k, d in expected.values())
    for name, (kept, dropped) in expected.items():
        assert f'<td class="l">{name}</td><td>{kept}</td><td>{dropped}</td>' in doc, name


def test_a_job_on_pipe_shards(micro_trajectory, tmp_path):
    """A job whose shards are pipe: commands (data.allow_pipe): the class_balanced policy reads its labels, the
    report its images and per-class split, `pruner cluster` its labels and `pruner explain` its captions, all
    through the commands, as the job itself read them (they once failed: fsspec cannot open pipe: URLs)."""
    from pruner.jobs.prune import run

    files = demo_pool_shards()[:2]
    pipes = {f"pipe:cat {u}": u for u in files}
    cfg = small_job_config(tmp_path, micro_trajectory, data={"shards": list(pipes), "allow_pipe": True},
                           select={"policy": "class_balanced", "score": "diffin_target", "keep_fraction": 0.5})
    status, summary = run(load_config(data=cfg))
    assert status == 0 and summary["policy"]["policy"] == "class_balanced"
    root = Path(cfg["output_dir"]) / summary["job"]
    rows = pq.read_table(root / "ranking.parquet", columns=["shard_url", "key", "kept"]).to_pylist()
    assert {r["shard_url"] for r in rows} == set(pipes)
    names = _classnames(files)
    expected: dict[str, list[int]] = {}
    for r in rows:
        expected.setdefault(names[(pipes[r["shard_url"]], r["key"])], [0, 0])[0 if r["kept"] else 1] += 1
    assert len(expected) == 10 and all(abs(k - (k + d) / 2) <= 1 for k, d in expected.values())
    doc = build_report(root, tmp_path / "report.html", top=2).read_text()
    assert doc.count('src="data:image/jpeg;base64,') == 4 and "not read" not in doc
    for name, (kept, dropped) in expected.items():
        assert f'<td class="l">{name}</td><td>{kept}</td><td>{dropped}</td>' in doc, name
    assert cluster_main([str(root), "--clusters", "2", "--typical", "2"]) == 0
    clusters = json.loads((root / "clusters.json").read_text())["clusters"]
    assert all(c["label_share"] for c in clusters if c["size"])
    assert all(t["caption"] == _caption(pipes[t["shard_url"]], t["key"]) for c in clusters for t in c["typical"])
    out = tmp_path / "explain.json"
    uid = pq.read_table(root / "ranking.parquet", columns=["uid"])["uid"][0].as_py()
    assert explain_main([str(root), "--uid", uid, "-k", "3", "--out", str(out)]) == 0
    hits = json.loads(out.read_text())["proponents"]
    assert hits and all(h["caption"] == _caption(pipes[h["shard_url"]], h["key"]) for h in hits)


def test_spearman_matches_scipy(job):
    pf = pq.ParquetFile(job / "ranking.parquet")
    cols = ["diffin_target", "tracin_target", "baseline_loss"]
    sample = read_sample(pf, cols, max_rows=10**9, max_groups=64)
    assert len(sample[cols[0]]) == pf.metadata.num_rows
    expected = spearmanr(np.column_stack([sample[c] for c in cols])).statistic
    np.testing.assert_allclose(spearman(sample, cols), expected, atol=1e-12)


def test_bounded_reading_of_a_big_ranking(tmp_path):
    """Many row groups: the subsample spans the whole rank range; extremes skip NaN scores at the end."""
    n = 10_000
    s = np.linspace(1, 0, n)
    s[-100:] = np.nan  # NaN scores rank last
    path = tmp_path / "ranking.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(n)], "s": s}), path, row_group_size=500)
    pf = pq.ParquetFile(path)
    sample = read_sample(pf, ["s"], max_rows=1000, max_groups=8)
    assert 700 < len(sample["s"]) < 1300 and np.nanmax(sample["s"]) > 0.9 and np.isnan(sample["s"]).any()
    head, tail = read_extremes(pf, ["key", "s"], "s", 3)
    assert [r["key"] for r in head] == ["k0", "k1", "k2"]
    assert [r["key"] for r in tail] == ["k9899", "k9898", "k9897"]


def test_untrusted_text_is_escaped():
    row = {"key": '"><script>x</script>', "caption": "<img src=x onerror=alert(1)>", "image": None,
           "note": "<b>", "rank": 1, "kept": True, "s": 0.5}
    doc = _cards([row], "s")
    assert "<script>" not in doc and "<img" not in doc and "&lt;img src=x" in doc


def test_default_output_and_missing_job(job, tmp_path, capsys):
    assert build_report(job, top=1) == job / "report.html" and (job / "report.html").stat().st_size > 0
    err = capsys.readouterr().err  # progress on stderr over the shards read
    assert "images: 100%" in err and re.search(r"per-class split: 100%\|[^|]*\| 3/3 ", err), err
    assert main([str(tmp_path)]) == 2 and "summary.json does not exist" in capsys.readouterr().err


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install -y chromium)")
def test_renders_in_headless_chromium(explained, tmp_path):
    _, out = explained
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           "--window-size=1200,2000", out.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert shot.exists(), proc.stderr[-3000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 2000)
    assert max(ImageStat.Stat(im).var) > 100, "blank screenshot"
    px = np.asarray(im).reshape(-1, 3).astype(int)
    green = (np.abs(px - (0x3B, 0x8F, 0x5A)).max(axis=1) < 12).sum()  # the kept bars/histograms were drawn
    assert green > 2000, green
