"""The reduce step: per-shard score files -> global ranking, keep manifests and the job summary."""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pruner.config import JobConfig
from pruner.io.atomic import write_json_atomic
from pruner.io.layout import JobLayout
from pruner.io.manifests import write_manifests
from pruner.io.shards import RejectLog
from pruner.jobfiles import JobFiles
from pruner.scores.combine import INFLUENCE_COLUMNS, method_columns, removal_prediction
from pruner.select.duplicates import find_duplicate_uids, without_rows
from pruner.select.policies import apply_select_config
from pruner.select.rank import select, write_ranking
from pruner.scores.step_scales import step_scale_warnings
from pruner.select.stages import SELECT_SCORE, apply_filter, apply_niche, filter_selection, passing

log = logging.getLogger(__name__)
DUPLICATES_SCHEMA = pa.schema([(n, pa.string()) for n in ("uid", "url", "key", "kept_url", "kept_key")])
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def _summarise_ranking(path: Path, n_pool: float | None, max_rows: int = 1_000_000) -> dict:
    """Score quantiles per method (exact up to max_rows samples, else on a uniform hash subsample) and the
    predicted target-loss change of removing the dropped samples (their summed influence columns, TracIn's divided
    by ``n_pool``: scores.combine.removal_prediction); memory bounded by one row group + the subsample."""
    pf = pq.ParquetFile(path)
    cols = method_columns(pf.schema_arrow.names)
    n = pf.metadata.num_rows
    frac = min(1.0, max_rows / max(n, 1))
    sample = {c: [] for c in cols}
    dropped_sum = {c: 0.0 for c in INFLUENCE_COLUMNS if c in cols}
    for batch in pf.iter_batches(columns=cols + ["kept"]):
        d = batch.to_pydict()
        keep_row = np.ones(batch.num_rows, bool) if frac >= 1 or "baseline_random" not in d else \
            np.asarray(d["baseline_random"]) < frac
        kept = np.asarray(d["kept"], bool)
        for c in cols:
            v = np.asarray(d[c], np.float64)
            sample[c].append(v[keep_row])
            if c in dropped_sum:
                dropped_sum[c] += float(np.nansum(v[~kept]))
    quant = {}
    for c, parts in sample.items():
        v = np.concatenate(parts) if parts else np.zeros(0)
        v = v[np.isfinite(v)]
        quant[c] = {str(q): float(np.quantile(v, q)) for q in QUANTILES} if len(v) else {}
    return {"score_quantiles": quant, "quantiles_exact": frac >= 1,
            "predicted_target_loss_change_from_dropped": removal_prediction(dropped_sum, n_pool)}


def finalize(cfg: JobConfig, layout: JobLayout, pool: list[str], run_stats: dict) -> dict:
    """Rank, select, write ranking/manifests/summary. Requires every shard of the pool to be scored; the manifest
    lists every shard of the pool, those without a scored sample with no key.

    Samples sharing a uid (:mod:`pruner.select.duplicates`): the first in sorted shard order is ranked, the later
    ones are excluded and reported as rejects ``duplicate_uid`` (``duplicates.parquet`` names both locations).

    ``select.policy: top_k`` without dedup: the exact global top-k (:func:`select`), ``summary["selection"]`` its
    cut-off. Otherwise the keep set is :func:`apply_select_config`'s (with ``keep/policy.json``), the ranking's
    ``kept`` column is that set, ``summary["selection"]`` is None and ``summary["policy"]`` holds the policy summary
    (per-group counts, dedup counts). ``summary["select"]``: the select settings applied (a job re-run with other
    ones re-selects: pruner.jobs.prune.run).

    All or nothing: every output is first written into a staging folder (``layout.reduce_staging``); only when all
    of them are complete are they moved into place, summary.json last. A failure before that leaves the previous
    ranking, keep set and summary as they were; a crash while moving leaves no summary.json, so the job counts as
    unfinished and its re-run reduces again."""
    t0 = time.time()
    files = [layout.scores(u) for u in pool]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} shards have no score file (first: {missing[0]}); re-run the job")
    nonempty = [f for f in files if pq.read_metadata(f).num_rows > 0]
    dups = find_duplicate_uids(nonempty)
    stage = JobLayout(layout.reduce_staging)
    shutil.rmtree(stage.root, ignore_errors=True)
    stage.shards_dir.mkdir(parents=True)
    try:
        summary = _reduce_into(cfg, layout, stage, pool, nonempty, dups, run_stats, t0)
        _commit(layout, stage, summary)
    finally:
        shutil.rmtree(stage.root, ignore_errors=True)
    return summary


def _reduce_into(cfg: JobConfig, layout: JobLayout, stage: JobLayout, pool: list[str], nonempty: list[Path], dups,
                 run_stats: dict, t0: float) -> dict:
    """Every output of the reduce step, written into the staging folder ``stage``, laid out as a job directory
    (ranking.parquet, keep/, duplicates.parquet, config.yaml); returns the summary. The ranking and manifests read
    the score files with the duplicates' rows removed (copies in the stage's shards/ of the few files that hold
    any)."""
    view = [without_rows(f, dups.rows[f], stage.shards_dir / f.name) if f in dups.rows else f for f in nonempty]
    s = cfg.select
    keep_dir, ranking = stage.keep_dir, stage.ranking
    stages, fsel = [], None
    if s.filter_score is not None and s.filter_fraction > 0:
        fsel = filter_selection(view, s.filter_score, s.filter_fraction)
    policy = None
    if s.uses_policy:
        ineligible = None
        if fsel is not None:  # over the rows of the sorted score files, as select_policy reads them
            ineligible = np.concatenate([~passing(fsel, pq.read_table(f, columns=["uid", s.filter_score]))
                                         for f in sorted(nonempty)])
            stages.append({"stage": "filter", "score": s.filter_score, "fraction": s.filter_fraction,
                           "cutoff": fsel.cutoff_score, "passed": fsel.n_keep, "set_apart": fsel.n_total - fsel.n_keep})
        policy, n_total, n_keep = _apply_policy(cfg, layout, pool, [layout.scores(u) for u in pool], nonempty, dups,
                                                keep_dir, ineligible)
        keep = policy.pop("keep")  # over the rows of the sorted score files, as select_policy reads them
        if dups:
            keep = keep[~dups.mask(sorted(nonempty))]
        ranked_by = score = s.score
        write_ranking(sorted(view, key=lambda f: f.name), ranked_by, ranking, keep, metadata=_ranking_meta(cfg, layout))
        manifests = policy.pop("manifests")
        selection = None
    else:
        ranked_by, floor, score = s.score, None, s.score
        if fsel is not None or s.niche_alpha is not None:
            stage.filtered_dir.mkdir()
        if fsel is not None:
            view, record, floor = apply_filter(view, s.score, fsel, s.filter_fraction, stage.filtered_dir)
            stages.append(record)
            ranked_by = SELECT_SCORE
        if s.niche_alpha is not None:
            view, record = apply_niche(view, ranked_by, s.score, s.filter_score, s.niche_alpha, floor,
                                       stage.filtered_dir)
            if not record["niche"]:  # rewritten to the filter score; a niche keeps the order it was given
                ranked_by = SELECT_SCORE
            stages.append(record)
            score = record["ranked_by"]
            log.info("niche test of %s: excess %d samples against the bound %.0f at level %g: %s, ranked by %s",
                     s.score, record["excess"], record["bound"], s.niche_alpha,
                     "a niche" if record["niche"] else "no niche", score)
        sel = select(view, ranked_by, keep_fraction=s.keep_fraction, keep_count=s.keep_count, threshold=s.threshold)
        write_ranking(view, ranked_by, ranking, sel, metadata=_ranking_meta(cfg, layout))
        manifests = write_manifests(view, sel, keep_dir, pool)
        selection, n_total, n_keep = sel.as_dict(), sel.n_total, sel.n_keep
    stages.append({"stage": "policy" if s.uses_policy else "top_k", "score": score, "kept": n_keep,
                   "ranked_by": ranked_by})
    rejects = RejectLog()
    for u in pool:
        if layout.rejects(u).exists():
            rejects.merge(RejectLog.read(layout.rejects(u)))
    for d in dups.records:
        rejects.add(d["url"], d["key"], "duplicate_uid",
                    f"sample {d['key']!r} in {d['url']}: uid {d['uid']!r} is also sample {d['kept_key']!r} of "
                    f"{d['kept_url']}, which sorts first and is the one ranked (fix: give every sample of the lake a "
                    f"unique json uid, or drop one of the copies)")
    pq.write_table(pa.Table.from_pylist(dups.records, schema=DUPLICATES_SCHEMA), stage.duplicates)
    stage.config.write_bytes(cfg.to_yaml())
    if dups:
        log.warning("%d sample(s) share a uid with a sample of an earlier shard and were left out (reject "
                    "duplicate_uid, listed in %s), e.g. %s", len(dups), layout.duplicates, dups.records[0])
    manifests = {**manifests, "paths": {n: str(layout.keep_dir / Path(p).name) for n, p in manifests["paths"].items()}}
    summary = {
        "job": layout.root.name, "select": s.model_dump(mode="json"), "score": score, "selection": selection,
        "stages": stages,
        "counts": {"shards": len(pool), "samples": n_total, "kept": n_keep,
                   "dropped": n_total - n_keep, "rejected": len(rejects)},
        "rejects_by_reason": rejects.counts(),
        "manifests": manifests,
        "run": run_stats,
        "reduce_seconds": time.time() - t0,
        "versions": _versions(),
    }
    if policy is not None:
        summary["policy"] = policy
    summary["warnings"] = uid_warnings(manifests, n_keep)
    scored = JobLayout(Path(run_stats["retarget_of"])) if run_stats.get("retarget_of") else layout  # shared states
    if scored.trajectory.exists():
        scales = JobFiles(scored).step_scales()
        if scales:
            summary["step_scales"] = scales
            summary["warnings"] += step_scale_warnings(scales, cfg.scores.diffin.train_batch_size)
    n_pool = JobFiles(layout).pool_size() if layout.trajectory.exists() else None  # the weights' N (b_t = eta / N)
    summary.update(_summarise_ranking(ranking, n_pool))
    return summary


def uid_warnings(manifests: dict, n_keep: int) -> list[str]:
    """What the keep set's subset file cannot do, said where users look (the prune command's last lines, the report):
    kept samples whose uid is not DataComp's 32 hex digits (``n_uid_fallback``) are in keep/uids.npy as the md5 of
    their uid, which DataComp's resharder, matching the json uid in the shards, never finds."""
    n = manifests.get("n_uid_fallback", 0)
    if not n:
        return []
    return [f"{n} of the {n_keep} kept samples have no DataComp-style json uid (32 lowercase hex digits): "
            f"keep/uids.npy holds the md5 of their uids (<folder>/<shard>/<key> when the json has none; the originals "
            f"are in keep/uids.fallback.parquet), which DataComp's resharder cannot match, so it would write "
            f"{'none' if n == n_keep else 'fewer'} of them. Use keep/manifest.json (webdataset select, pruner "
            f"materialize) or keep/keep.parquet for these samples, or give the lake json uids"]


def _commit(layout: JobLayout, stage: JobLayout, summary: dict) -> None:
    """Move the staged outputs into the job directory: summary.json goes first (so a crash while moving leaves the
    job unfinished), then the ranking, the keep set (its files replaced one by one, files the new keep set lacks,
    such as an earlier policy's policy.json, removed), the duplicates list and config.yaml (whose select settings are
    the ones applied); summary.json is written last."""
    layout.summary.unlink(missing_ok=True)
    os.replace(stage.ranking, layout.ranking)
    layout.keep_dir.mkdir(exist_ok=True)
    new = {p.name for p in stage.keep_dir.iterdir()}
    for p in stage.keep_dir.iterdir():
        os.replace(p, layout.keep_dir / p.name)
    for p in layout.keep_dir.iterdir():
        if p.name not in new and p.is_file():
            p.unlink()
    os.replace(stage.duplicates, layout.duplicates)
    os.replace(stage.config, layout.config)
    write_json_atomic(layout.summary, summary)


def _ranking_meta(cfg: JobConfig, layout: JobLayout) -> dict[str, str]:
    """ranking.parquet's schema metadata: the job and the select settings that ranked it."""
    return {"pruner.job": layout.root.name, "pruner.select": json.dumps(cfg.select.model_dump(mode="json"))}


def _apply_policy(cfg: JobConfig, layout: JobLayout, pool: list[str], pool_files: list[Path],
                  nonempty: list[Path], dups, keep_dir: Path,
                  ineligible: np.ndarray | None = None) -> tuple[dict, int, int]:
    """(policy summary with its bool [n] "keep" over the rows of ``nonempty`` in order, n_total, n_keep); the
    duplicates' rows are never kept and not counted. Policies read the whole job directory (score files, stored
    features, clusters), so it must hold exactly the pool's shards (compared by path: every pool file exists, so any
    difference is a file on disk only; an empty one counts too, as it is a shard outside the pool all the same)."""
    extra = sorted(set(layout.score_files()) - set(pool_files))
    if extra:
        raise RuntimeError(f"{layout.shards_dir} holds score files of shards outside the pool (first: "
                           f"{extra[0]}); select.policy {cfg.select.policy!r} / dedup work on "
                           f"the whole job directory (fix: remove them, or use policy top_k without dedup)")
    exclude = dups.mask(sorted(nonempty)) if dups else None
    policy = apply_select_config(layout.root, cfg.select, seed=cfg.seed, score_files=nonempty, pool=pool,
                                 keep_dir=keep_dir, exclude=exclude, ineligible=ineligible)
    return policy, policy["n_total"], policy["n_keep"]


def _versions() -> dict:
    """The versions of the packages behind the scores: pruner's and torch's own (torch's with its build tag, e.g.
    +cu130), the others from their installed metadata, so nothing else is imported (a job run by the local runner never imports Ray;
    None for a package that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import pruner

    def installed(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None
    return {"pruner": pruner.__version__, "torch": torch.__version__,
            "open_clip": installed("open_clip_torch"), "ray": installed("ray"), "pyarrow": installed("pyarrow"),
            "python": platform.python_version()}
