"""The reduce step: per-shard score files -> global ranking, keep manifests and the job summary."""
from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pruner.config import JobConfig
from pruner.io.atomic import write_json_atomic
from pruner.io.layout import JobLayout
from pruner.io.manifests import write_manifests
from pruner.io.shards import RejectLog
from pruner.select.policies import apply_select_config
from pruner.select.rank import select, shard_score_files, write_ranking

_COMPONENT = re.compile(r"^c\d+_")
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
# score columns whose values are influences on a loss (removal convention), so that the sum over the dropped
# samples predicts the change of that loss caused by dropping them (data deletion, methods §1.3)
INFLUENCE_COLUMNS = ("diffin_target", "diffin_train", "tracin_target")


def method_columns(schema_names) -> list[str]:
    return [c for c in schema_names if c not in ("uid", "key", "shard_url", "row", "rank", "kept")
            and not _COMPONENT.match(c)]


def _summarise_ranking(path: Path, max_rows: int = 1_000_000) -> dict:
    """Score quantiles per method (exact up to max_rows samples, else on a uniform hash subsample) and the
    summed influence of the dropped samples; memory bounded by one row group + the subsample."""
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
            "predicted_target_loss_change_from_dropped": dropped_sum}


def finalize(cfg: JobConfig, layout: JobLayout, pool: list[str], run_stats: dict) -> dict:
    """Rank, select, write ranking/manifests/summary. Requires every shard of the pool to be scored; the manifest
    lists every shard of the pool, those without a scored sample with no key.

    ``select.policy: top_k`` without dedup: the exact global top-k (:func:`select`), ``summary["selection"]`` its
    cut-off. Otherwise the keep set is :func:`apply_select_config`'s (it writes the manifests and
    ``keep/policy.json``), the ranking's ``kept`` column is that set, ``summary["selection"]`` is None and
    ``summary["policy"]`` holds the policy summary (per-group counts, dedup counts). ``summary["select"]``: the
    select settings applied (a job re-run with other ones re-selects: pruner.jobs.prune.run)."""
    t0 = time.time()
    files = [layout.scores(u) for u in pool]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} shards have no score file (first: {missing[0]}); re-run the job")
    nonempty = [f for f in files if pq.read_metadata(f).num_rows > 0]
    s = cfg.select
    policy = None
    if s.uses_policy:
        policy, n_total, n_keep = _apply_policy(cfg, layout, pool, files, nonempty)
        write_ranking(sorted(nonempty), s.score, layout.ranking, policy.pop("keep"))
        manifests = policy.pop("manifests")
        selection = None
    else:
        sel = select(nonempty, s.score, keep_fraction=s.keep_fraction, keep_count=s.keep_count,
                     threshold=s.threshold)
        write_ranking(nonempty, s.score, layout.ranking, sel)
        manifests = write_manifests(nonempty, sel, layout.keep_dir, pool)
        (layout.keep_dir / "policy.json").unlink(missing_ok=True)  # left by an earlier selection with a policy
        selection, n_total, n_keep = sel.as_dict(), sel.n_total, sel.n_keep
    rejects = RejectLog()
    for u in pool:
        if layout.rejects(u).exists():
            rejects.merge(RejectLog.read(layout.rejects(u)))
    summary = {
        "job": layout.root.name, "select": s.model_dump(mode="json"), "score": s.score, "selection": selection,
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
    summary.update(_summarise_ranking(layout.ranking))
    write_json_atomic(layout.summary, summary)
    return summary


def _apply_policy(cfg: JobConfig, layout: JobLayout, pool: list[str], pool_files: list[Path],
                  nonempty: list[Path]) -> tuple[dict, int, int]:
    """(policy summary with its bool [n] "keep" in sorted score-file order, n_total, n_keep). Policies read the
    whole job directory (score files, stored features, clusters), so it must hold exactly the pool's shards
    (compared by path: every pool file exists, so any difference is a file on disk only; an empty one counts too,
    as it is a shard outside the pool all the same)."""
    extra = sorted(set(shard_score_files(layout.root)) - set(pool_files))
    if extra:
        raise RuntimeError(f"{layout.shards_dir} holds score files of shards outside the pool (first: "
                           f"{extra[0]}); select.policy {cfg.select.policy!r} / dedup work on "
                           f"the whole job directory (fix: remove them, or use policy top_k without dedup)")
    policy = apply_select_config(layout.root, cfg.select, seed=cfg.seed, score_files=nonempty, pool=pool)
    return policy, policy["n_total"], policy["n_keep"]


def _versions() -> dict:
    import open_clip
    import pyarrow
    import ray
    import torch

    import pruner
    return {"pruner": getattr(pruner, "__version__", "0.1.0"), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__,
            "python": platform.python_version()}
