"""``pruner report <job dir> [--out report.html]``: a self-contained HTML report of a finished job.

One file, no external resources: inline CSS, plots as inline SVG (no plotting library), thumbnails as base64
JPEG data URIs. Sections: the job's counts and selection; the keep/drop split (and per class when the shards'
``.json`` metadata has ``classname``); score histograms per method, kept and dropped stacked; agreement between
methods (Spearman rank correlation); the most helpful and most harmful pairs by the job's selection score
(``summary.json: score``) with image, caption and score; the results ``pruner explain`` saved in the job
(``explain/results/``: each query with its TracIn proponents and opponents, image, caption and score) and the
gradient clusters ``pruner cluster`` wrote (``clusters.json``: size, labels, mean score, typical captions);
rejected samples by reason with examples.

Memory is bounded independently of the pool size: the ranking (sorted by rank) is read a row group at a time,
only the columns needed; the most helpful/harmful pairs come from its first/last row groups; histograms and
correlations use a subsample of at most ``max_rows`` rows spread over at most ``max_groups`` evenly spaced row
groups (exact when the ranking fits); the per-class split reads at most ``class_shards`` evenly spaced shards;
at most the ``max_explain`` newest explain results and the 100 largest clusters are shown.
Images are read back from the shards by (shard URL, key) (``pruner.io.shards.iter_shard``), class names from their
text members only; a ``pipe:`` URL is run only if the job's config lists it with ``data.allow_pipe``, as the job
ran it (pruner.jobfiles.JobFiles.trusted_pipes).
Untrusted text (captions, keys, reject details) is HTML-escaped. Reading images and the per-class split show
progress bars (shards) on stderr.
"""
from __future__ import annotations

import base64
import heapq
import html
import io
import json
import sys
import tarfile
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Callable, Container, Optional

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pruner.explain.pool import read_text_members
from pruner.io.atomic import write_bytes_atomic
from pruner.io.layout import JobLayout
from pruner.io.shards import RejectLog, iter_shard
from pruner.jobfiles import JobFiles
from pruner.scores.combine import method_columns

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1150px;color:#1d232b;background:#fff}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #d6dbe1;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 8px;border:1px solid #d6dbe1;text-align:right}
th{background:#f2f4f7}td.l,th.l{text-align:left}.note{color:#5b6570;font-size:12px}.warning{background:#fff4e5;border-left:4px solid #e8590c;padding:6px 10px}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:170px;border:1px solid #d6dbe1;border-radius:6px;padding:6px}
.card img{width:158px;height:158px;object-fit:contain;image-rendering:pixelated;background:#f2f4f7}
.card .cap{font-size:12px;margin:4px 0;overflow-wrap:anywhere}.card .s{font:11px monospace;color:#5b6570}
.wide{overflow-x:auto}.corr td,.corr th{font-size:12px;padding:2px 5px}svg.hist{border:1px solid #eef0f3}
.kept{color:#1f7a3a}.dropped{color:#b3261e}.top{align-items:flex-start}
"""
KEPT_COLOR, DROPPED_COLOR = "#3b8f5a", "#c8553d"


def thumbnail(image, size: int = 256):
    """A copy of a PIL image scaled down to fit ``size`` x ``size`` (never up)."""
    im = image.copy()
    im.thumbnail((size, size))
    return im


def thumb_uri(image) -> str:
    """:func:`thumbnail` as a base64 JPEG data URI."""
    buf = io.BytesIO()
    thumbnail(image).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.4g}"


def _table(header: list[str] | None, rows: list[list], left: int | set[int] = 1) -> str:
    """An HTML table (no header row when ``header`` is None); the first ``left`` columns (or the columns in the set
    ``left``) are left-aligned; cells are escaped."""
    lefts = set(range(left)) if isinstance(left, int) else left
    cls = lambda i: ' class="l"' if i in lefts else ""  # noqa: E731
    head = "<tr>" + "".join(f"<th{cls(i)}>{html.escape(str(h))}</th>" for i, h in enumerate(header)) + "</tr>" \
        if header else ""
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{html.escape(str(c))}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table>{head}{body}</table>"


# ---------------------------------------------------------------------------------------------------- reading


def read_sample(pf: pq.ParquetFile, columns: list[str], max_rows: int, max_groups: int, seed: int = 0) -> dict:
    """{column: array} of a subsample of at most ~max_rows rows from at most max_groups evenly spaced row groups
    (all rows when the file holds at most max_rows rows in at most max_groups groups)."""
    n_groups = pf.num_row_groups
    groups = np.unique(np.linspace(0, n_groups - 1, min(n_groups, max_groups)).round().astype(int)) if n_groups else []
    rows_in = sum(pf.metadata.row_group(int(g)).num_rows for g in groups)
    frac = min(1.0, max_rows / max(rows_in, 1))
    rng = np.random.default_rng(seed)
    parts = defaultdict(list)
    for g in groups:
        t = pf.read_row_group(int(g), columns=columns)
        pick = rng.random(t.num_rows) < frac if frac < 1 else np.ones(t.num_rows, bool)
        for c in columns:
            parts[c].append(t.column(c).to_numpy(zero_copy_only=False)[pick])
    return {c: np.concatenate(parts[c]) if parts[c] else np.zeros(0) for c in columns}


def read_extremes(pf: pq.ParquetFile, columns: list[str], score: str, n: int) -> tuple[list[dict], list[dict]]:
    """(the first n rows of the rank-ordered ranking, the n rows with the lowest finite ``score``, lowest first). The
    tail is a streaming bottom-n over the row groups (with a filter stage, the ranking's own tail is the set-apart
    samples, ordered by the filter score, not the lowest by the selection score); ties by position in the ranking."""
    head = []
    for g in range(pf.num_row_groups):
        head += pf.read_row_group(g, columns=columns).to_pylist()[: n - len(head)]
        if len(head) >= n:
            break
    tail: list[tuple] = []  # (score, position in the ranking, row)
    pos = 0
    for g in range(pf.num_row_groups):
        rows = pf.read_row_group(g, columns=columns).to_pylist()
        tail = heapq.nsmallest(n, tail + [(r[score], pos + i, r) for i, r in enumerate(rows) if np.isfinite(r[score])],
                               key=lambda x: x[:2])
        pos += len(rows)
    return head, [r for _, _, r in tail]


def attach_images(rows: list[dict], convert: Callable = thumb_uri, pipes: Container[str] = frozenset()) -> None:
    """Add ``image`` (``convert(PIL image)``, default a thumbnail data URI; None when absent), ``caption`` and
    ``note`` (why there is no image) to each row, reading each shard once and only up to the last wanted key.
    Rows are matched by (shard_url, key); several rows may name the same sample (the most helpful and most harmful
    lists overlap when the pool holds fewer than twice the rows shown), each gets it. A ``pipe:`` URL is run only if
    it is one of ``pipes`` (the commands the job's config lists: pruner.jobfiles.JobFiles.trusted_pipes)."""
    by_shard: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        r.update(image=None, caption="", note="not found in its shard")
        by_shard[r["shard_url"]][r["key"]].append(r)
    for url, want in tqdm(by_shard.items(), desc="images", unit="shard", dynamic_ncols=True):
        log = RejectLog()
        if url.startswith("pipe:") and url not in pipes:
            note = "not read: a pipe: URL that the job's config does not list with data.allow_pipe"
        else:
            for s in iter_shard(url, log, allow_pipe=url in pipes):
                if s.key in want:
                    image = convert(s.image)
                    for r in want.pop(s.key):
                        r.update(image=image, caption=s.caption, note="")
                    if not want:
                        break
            note = "shard unreadable" if "unreadable_shard" in log.counts() else "not found in its shard"
        for r in (r for same in want.values() for r in same):
            r["note"] = note


def _kept_by_shard(layout: JobLayout, score_files: list[Path]) -> dict[str, dict]:
    """{shard URL: {key: kept}} for the shards of ``score_files`` (empty files name no URL), from the ranking's
    ``kept`` column (one filtered read), whatever selected it (top-k, a filter stage, a policy)."""
    urls = []
    for f in score_files:
        t = pq.read_table(f, columns=["shard_url"])
        if t.num_rows:
            urls.append(t.column("shard_url")[0].as_py())  # one score file per shard
    out: dict[str, dict] = {u: {} for u in urls}
    if urls:
        t = pq.read_table(layout.ranking, columns=["shard_url", "key", "kept"], filters=[("shard_url", "in", urls)])
        for url, key, kept in zip(*(t.column(c).to_pylist() for c in ("shard_url", "key", "kept"))):
            out[url][key] = kept
    return out


def _policy_facts(summary: dict) -> dict:
    """The "selection" facts of a policy job: summary["policy"] without the per-group counts and unset fields."""
    return {k: v for k, v in summary["policy"].items() if k != "groups" and v is not None}


def class_split(layout: JobLayout, max_shards: int, pipes: Container[str] = frozenset()) -> tuple[dict, int, int]:
    """({classname: [kept, dropped]}, shards read, shards in the job) from at most max_shards evenly spaced
    shards: kept as the ranking records it, classname from the ``.json`` metadata in the shard (text members
    only, up to the last scored key; a shard that cannot be read, or a ``pipe:`` one not in ``pipes``, is
    left out of the counts). Empty when no sample has a ``classname``."""
    files = layout.score_files()
    pick = [files[int(i)] for i in np.unique(np.linspace(0, len(files) - 1, min(len(files), max_shards)).round())] \
        if files else []
    counts = defaultdict(lambda: [0, 0])
    for url, kept in tqdm(_kept_by_shard(layout, pick).items(), desc="per-class split", unit="shard",
                          dynamic_ncols=True):
        if url.startswith("pipe:") and url not in pipes:
            continue
        try:
            texts = read_text_members(url, kept, url in pipes)
        except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
            print(f"per-class split: {url} left out, it cannot be read ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        for key, was_kept in kept.items():
            name = (texts.get(key) or {"meta": {}})["meta"].get("classname")
            if isinstance(name, str):
                counts[name][0 if was_kept else 1] += 1
    return dict(sorted(counts.items())), len(pick), len(files)


def read_explain_results(layout: JobLayout, limit: int) -> tuple[list[dict], int]:
    """(the newest ``limit`` results saved by ``pruner explain`` in ``explain/results/``, newest first; how many
    are saved)."""
    paths = list(layout.explain_results.glob("*.json")) if layout.explain_results.is_dir() else []
    newest = sorted(paths, key=lambda p: (-p.stat().st_mtime_ns, p.name))[:limit]
    return [json.loads(p.read_text()) for p in newest], len(paths)


def explain_cards(results: list[dict], top: int) -> list[dict]:
    """Give each saved explain result ``query_row`` (a card for the query: ``image`` a data URI or None with a
    ``note``, ``caption``) and ``shown`` (copies of its first ``top`` proponents, then its first ``top``
    opponents). A query pair's image is read from its file if still there. Returns the rows whose images are to
    be read from the shards (:func:`attach_images`): the shown hits and pool-sample queries."""
    rows = []
    for r in results:
        q = r["query"]
        r["shown"] = [dict(h) for h in r["proponents"][:top] + r["opponents"][:top]]
        r["query_row"] = {"image": None, "caption": q.get("caption") or "", "note": ""}
        rows += r["shown"]
        if q["type"] == "pool_sample":
            r["query_row"].update(shard_url=q["shard_url"], key=q["key"])
            rows.append(r["query_row"])
        elif q["type"] == "pair":
            try:
                with Image.open(q["image"]) as im:
                    r["query_row"]["image"] = thumb_uri(im.convert("RGB"))
            except OSError:
                r["query_row"]["note"] = f"query image {q['image']} is no longer readable"
    return rows


def read_rejects(layout: JobLayout, limit: int) -> list[dict]:
    """Up to ``limit`` reject records (url, key, reason, detail), in shard-file order."""
    out = []
    for f in sorted(layout.shards_dir.glob("*.rejects.parquet")):
        out += pq.read_table(f).to_pylist()[: limit - len(out)]
        if len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------------------------------- sections


def _svg_hist(values: np.ndarray, kept: np.ndarray, title: str, bold: bool, bins: int = 40) -> str:
    """A 260x150 inline-SVG histogram of the finite values, kept (bottom) and dropped (top) stacked."""
    w, h, x0, x1, y0, y1 = 260, 150, 6, 254, 32, 128
    ok = np.isfinite(values)
    weight = "bold" if bold else "normal"
    parts = [f'<svg class="hist" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">',
             f'<text x="{w / 2}" y="14" text-anchor="middle" font-size="12" font-weight="{weight}">'
             f'{html.escape(title)}</text>',
             f'<line x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="#888"/>']
    if ok.any():
        edges = np.histogram_bin_edges(values[ok], bins=bins)
        nk = np.histogram(values[ok & kept], edges)[0]
        nd = np.histogram(values[ok & ~kept], edges)[0]
        scale = (y1 - y0) / max(int((nk + nd).max()), 1)
        bw = (x1 - x0) / bins
        for i, (k, d) in enumerate(zip(nk, nd)):
            x = x0 + i * bw
            for count, base, color in ((k, 0, KEPT_COLOR), (d, k, DROPPED_COLOR)):
                if count:
                    parts.append(f'<rect x="{x:.1f}" y="{y1 - (base + count) * scale:.1f}" width="{bw:.1f}" '
                                 f'height="{count * scale:.1f}" fill="{color}"/>')
        parts += [f'<text x="{x0}" y="{h - 8}" font-size="10">{_fmt(float(edges[0]))}</text>',
                  f'<text x="{x1}" y="{h - 8}" font-size="10" text-anchor="end">{_fmt(float(edges[-1]))}</text>',
                  f'<text x="{x0}" y="{y0 - 4}" font-size="10" fill="#5b6570">max {int((nk + nd).max())}</text>']
    return "".join(parts) + "</svg>"


def _histograms(sample: dict, methods: list[str], score: str) -> str:
    kept = sample["kept"].astype(bool)
    return '<div class="grid">' + "".join(_svg_hist(sample[m].astype(float), kept, m + (" (selection)" if m == score
                                          else ""), m == score) for m in methods) + "</div>"


def spearman(sample: dict, methods: list[str]) -> np.ndarray:
    """Spearman rank correlation matrix over the rows where every method is finite (NaN if < 3 rows or constant)."""
    from scipy.stats import rankdata
    x = np.column_stack([sample[m].astype(float) for m in methods])
    x = x[np.isfinite(x).all(axis=1)]
    if len(x) < 3:
        return np.full((len(methods), len(methods)), np.nan)
    r = rankdata(x, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(r, rowvar=False)


def _corr_table(corr: np.ndarray, methods: list[str]) -> str:
    def cell(v):
        if not np.isfinite(v):
            return "<td>–</td>"
        color = f"rgba(59,143,90,{abs(v):.2f})" if v >= 0 else f"rgba(200,85,61,{abs(v):.2f})"
        return f'<td style="background:{color}">{v:+.2f}</td>'
    head = "".join(f"<th>{html.escape(m).replace('_', '_<wbr>')}</th>" for m in methods)
    body = "".join(f'<tr><th class="l">{html.escape(m)}</th>' + "".join(cell(v) for v in row) + "</tr>"
                   for m, row in zip(methods, corr))
    return f'<div class="wide"><table class="corr"><tr><th></th>{head}</tr>{body}</table></div>'


def _card(r: dict, info: str) -> str:
    """One card: the row's image (or the note why there is none), its caption and ``info`` (HTML, escaped)."""
    img = f'<img alt="{html.escape(r.get("key", "query"))}" src="{r["image"]}">' if r["image"] else \
        f'<div class="note">{html.escape(r["note"])}</div>'
    return f'<div class="card">{img}<div class="cap">{html.escape(r["caption"])}</div><div class="s">{info}</div></div>'


def _cards(rows: list[dict], score: str) -> str:
    out = []
    for r in rows:
        state = "kept" if r["kept"] else "dropped"
        out.append(_card(r, f'rank {r["rank"]} · <span class="{state}">{state}</span><br>'
                            f'{html.escape(score)} {_fmt(r[score])}<br>{html.escape(r["key"])}'))
    return '<div class="grid">' + "".join(out) + "</div>"


def _hit_cards(hits: list[dict]) -> str:
    return '<div class="grid">' + "".join(
        _card(h, f'rank {h["rank"]} · TracIn {_fmt(h["score"])}<br>{html.escape(h["uid"])}') for h in hits) + "</div>"


def _query_title(q: dict) -> str:
    if q["type"] == "pair":
        return f"Pair: {q['caption']}"
    if q["type"] == "pool_sample":
        return f"Pool sample {q['uid']}"
    if q["type"] == "target":
        return f"Target set {', '.join(q['shards'])} ({q['samples']} samples)"
    return "The job's target set"


def _explain_section(results: list[dict], n_saved: int, top: int) -> str:
    if not results:
        return ('<p class="note">No saved result: <code>pruner explain &lt;job dir&gt; ...</code> saves one per query '
                'in <code>explain/results/</code>.</p>')
    src = f"all {n_saved}" if len(results) == n_saved else f"the newest {len(results)} of {n_saved}"
    parts = [f'<p class="note">TracIn(z, q) = Σ<sub>i</sub> η<sub>i</sub> ⟨P g<sub>i</sub>(q), P g<sub>i</sub>(z)⟩ '
             f'over the stored projected gradients: proponents (highest) and opponents (lowest) of {src} saved '
             f'queries (<code>explain/results/</code>), at most {top} of each.</p>']
    for r in results:
        q = r["query"]
        facts = [["query id", q["id"]], ["explained", r.get("created", "–")], ["k", r["k"]],
                 ["index", r["index"]["kind"]]]
        n_pro = min(top, len(r["proponents"]))
        parts.append(f'<h3>{html.escape(_query_title(q))}</h3><div class="grid top">{_card(r["query_row"], "query")}'
                     f'{_table(None, facts, left=2)}</div><h4>Proponents</h4>{_hit_cards(r["shown"][:n_pro])}'
                     f'<h4>Opponents</h4>{_hit_cards(r["shown"][n_pro:])}')
    return "".join(parts)


def _clusters_section(c: Optional[dict], n_samples: int, score: str, limit: int = 100) -> str:
    if c is None:
        return ('<p class="note">No <code>clusters.json</code>: <code>pruner cluster &lt;job dir&gt;</code> writes '
                'one.</p>')
    stale = "" if c["n_samples"] == n_samples else \
        f' <b>Clustered when the job held {c["n_samples"]:,} samples (now {n_samples:,}): re-run pruner cluster.</b>'
    biggest = sorted(c["clusters"], key=lambda x: (-x["size"], x["cluster"]))[:limit]
    shown = "every cluster" if len(biggest) == len(c["clusters"]) else f"the {len(biggest)} largest clusters"
    rows = [[x["cluster"], x["size"], f'{x["size"] / max(c["n_samples"], 1):.1%}', _fmt(x["mean_cosine"]),
             _fmt(x["mean_scores"].get(score)),
             ", ".join(f"{k} {v:.0%}" for k, v in sorted(x.get("label_share", {}).items(), key=lambda kv: -kv[1])[:3]),
             " · ".join(t["caption"] for t in x["typical"] if t["caption"])] for x in biggest]
    return (f'<p class="note">{c["n_clusters"]} clusters of {c["n_samples"]:,} samples by spherical k-means in '
            f'gradient space (<code>pruner cluster</code>, seed {c["seed"]}, objective {_fmt(c["objective"])}); '
            f'{shown}, largest first; typical = closest to the centroid.{stale}</p>'
            + _table(["cluster", "size", "share", "mean cosine", f"mean {score}", "labels", "typical captions"], rows,
                     left={5, 6}))


def _class_section(counts: dict, read: int, total: int) -> str:
    if not counts:
        return '<p class="note">No <code>classname</code> in the shards\' json metadata.</p>'
    names = list(counts)
    kept = np.array([counts[c][0] for c in names])
    dropped = np.array([counts[c][1] for c in names])
    scale = 420 / max(int((kept + dropped).max()), 1)
    bars = "".join(f'<text x="0" y="{18 * i + 13}" font-size="12">{html.escape(c)}</text>'
                   f'<rect x="130" y="{18 * i + 2}" width="{k * scale:.1f}" height="14" fill="{KEPT_COLOR}"/>'
                   f'<rect x="{130 + k * scale:.1f}" y="{18 * i + 2}" width="{d * scale:.1f}" height="14" '
                   f'fill="{DROPPED_COLOR}"/>' for i, (c, k, d) in enumerate(zip(names, kept, dropped)))
    svg = f'<svg width="560" height="{18 * len(names) + 4}" role="img">{bars}</svg>'
    rows = [[c, k, d, f"{k / max(k + d, 1):.1%}"] for c, k, d in zip(names, kept, dropped)]
    src = f"all {total} shards" if read == total else f"{read} of {total} shards (evenly spaced)"
    return (f'<p class="note">From {src}. <span class="kept">kept</span> / <span class="dropped">dropped</span>'
            f'</p>{svg}' + _table(["class", "kept", "dropped", "keep rate"], rows))


# ---------------------------------------------------------------------------------------------------- report


def _stage_fact(st: dict) -> list[str]:
    """The report's line for a filter stage or niche test of summary.json."""
    if st["stage"] == "filter":
        return ["filter stage", f"set apart {st['set_apart']} of {st['set_apart'] + st['passed']} (the lowest "
                f"{st['fraction']:g} by {st['score']}); they rank below the others"]
    if "ranked_by" not in st:  # a job reduced by the earlier rule: the stand-out tail led, the rest by rest_by
        verdict = (f"a niche: those {st['head']} led the ranking, the rest followed by {st['rest_by']}" if st["head"]
                   else f"no niche (a target like the pool itself): {st['rest_by']} ranked the pool")
    else:
        verdict = (f"a niche: {st['ranked_by']} ranked" if st["niche"] else
                   f"no niche (a target like the pool itself): {st['ranked_by']} ranked the pool")
    return ["niche test", f"{st['score']}: {st['upper_tail']} samples stand out, {st['excess']} more than the mirrored "
            f"lower tail (bound {st['bound']:.0f} at level {st['alpha']:g}, {st['samples']} samples): {verdict}"]


def build_report(job_dir: str | Path, out: str | Path | None = None, top: int = 12, max_rows: int = 200_000,
                 max_groups: int = 64, class_shards: int = 16, max_explain: int = 20) -> Path:
    """Write the report of the finished job in ``job_dir`` to ``out`` (default ``<job dir>/report.html``)
    atomically; returns its path. Raises FileNotFoundError when the job has no summary.json/ranking.parquet."""
    layout = JobLayout(Path(job_dir))
    for p in (layout.summary, layout.ranking):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist (fix: point to the directory of a finished job)")
    job = JobFiles(layout)
    summary = job.summary()
    score, counts = summary["score"], summary["counts"]
    pf = pq.ParquetFile(layout.ranking)
    methods = method_columns(pf.schema_arrow.names)
    sample = read_sample(pf, methods + ["kept"], max_rows, max_groups)
    n_sample = len(sample["kept"])
    head, tail = read_extremes(pf, ["key", "shard_url", "rank", "kept", score], score, top)
    explained, n_explained = read_explain_results(layout, max_explain)
    pipes = job.trusted_pipes()
    attach_images(head + tail + explain_cards(explained, top), pipes=pipes)  # each shard read once
    classes = class_split(layout, class_shards, pipes)
    clusters = json.loads(layout.clusters_summary.read_text()) if layout.clusters_summary.exists() else None
    rejects = read_rejects(layout, 20)

    run = summary.get("run", {})
    facts = [["job", summary["job"]], ["selection score", score],
             ["selection", ", ".join(f"{k}={v}" for k, v in (summary["selection"] or _policy_facts(summary)).items()
                                     if k != "score")],
             *[_stage_fact(st) for st in summary.get("stages", []) if st["stage"] in ("filter", "niche_test")],
             ["samples", counts["samples"]], ["kept", counts["kept"]], ["dropped", counts["dropped"]],
             ["rejected by the reader", counts["rejected"]], ["shards", counts["shards"]],
             ["actors / GPUs", f'{run.get("actors", "–")} / {run.get("gpus", "–")}'],
             ["scoring seconds", _fmt(run.get("score_seconds"))]]
    facts += [[f"predicted change of the {k.split('_', 1)[1]} loss from dropping (by {k})", _fmt(v)]
              for k, v in summary.get("predicted_target_loss_change_from_dropped", {}).items()]
    facts += [["versions", ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items())]]
    n = counts["samples"]
    split = _table(["", "samples", "share"], [[k, counts[k], f"{counts[k] / max(n, 1):.1%}"]
                                             for k in ("kept", "dropped")])
    sampled = "all" if n_sample == pf.metadata.num_rows else f"a subsample of {n_sample:,} of {pf.metadata.num_rows:,}"
    reasons = summary.get("rejects_by_reason", {})
    reject_html = (_table(["reason", "samples"], sorted(reasons.items(), key=lambda kv: -kv[1]))
                   + f'<p class="note">Examples (first {len(rejects)}):</p>'
                   + _table(["shard", "key", "reason", "detail"],
                            [[r["url"], r["key"], r["reason"], r["detail"]] for r in rejects], left=4)
                   ) if reasons else "<p>No sample was rejected.</p>"
    body = f"""
<h1>pruner report: {html.escape(summary["job"])}</h1>
{"".join(f'<p class="warning"><b>Warning:</b> {html.escape(w)}</p>' for w in summary.get("warnings", []))}
{_table(None, facts, left=2)}
<h2>Keep / drop</h2>{split}
<h3>Per class</h3>{_class_section(*classes)}
<h2>Score distributions</h2>
<p class="note">Every score column is oriented higher = more helpful = keep. Colours: kept / dropped by
<b>{html.escape(score)}</b>. Rows: {sampled} samples.</p>
{_histograms(sample, methods, score)}
<h2>Agreement between methods</h2>
<p class="note">Spearman rank correlation on {sampled} samples.</p>
{_corr_table(spearman(sample, methods), methods)}
<h2>Most helpful pairs (highest {html.escape(score)})</h2>{_cards(head, score)}
<h2>Most harmful pairs (lowest {html.escape(score)})</h2>{_cards(tail, score)}
<h2>Explained queries (pruner explain)</h2>{_explain_section(explained, n_explained, top)}
<h2>Gradient clusters (pruner cluster)</h2>{_clusters_section(clusters, n, score)}
<h2>Rejected samples</h2>{reject_html}
"""
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>pruner report: '
           f'{html.escape(summary["job"])}</title><style>{CSS}</style></head><body>{body}</body></html>\n')
    out = Path(out) if out else layout.report
    write_bytes_atomic(out, doc.encode())
    return out
