"""Data deletion from a finished job: what removing a set of samples from training would do, without retraining.

* :func:`predict`: the predicted change of the target (and training) loss, the sum of the stored influences over the
  set (removal convention: positive = removing them raises the loss), per influence column. Each column is in loss
  units: Diff-In's b_t, a_t carry 1/N; TracIn's sum is divided by N here.
* :func:`parameter_update`: Diff-In's parameter influence of the set, delta = theta_T^{-S} - theta_T, in parameter
  space. Propagated form (the job's default): sum_t E_{>t} (h_t / N) phi(h_t F_t) g_S(theta_t), the closed form of
  pruner.scores.propagation with the empirical Fisher F_t of the job's curvature subsample in place of its sketch
  K_t, g_S the summed gradient of the set, E_{>t} the exp(-h F) of the later intervals; the matrix functions by
  Lanczos on Fisher-vector products (two passes over the subsample each). exact_increment form: sum_t b_t g_S +
  a_t H_B g_S (H_B g by central differences of the reference gradient). Only the scored parameters (every linear
  layer) move.
* :func:`write_update`: theta_T + delta as an OpenCLIP checkpoint (``open_clip.load_checkpoint`` and pruner load it).

Cost of an update: per checkpoint one gradient pass over the set, and 2 x ``lanczos_steps`` Fisher-vector products
(propagated) or 2 reference-batch gradients (exact_increment). Memory: ``lanczos_steps`` parameter-sized vectors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pruner.config import JobConfig
from pruner.io.atomic import atomic_path
from pruner.io.layout import JobLayout
from pruner.io.shards import RejectLog, iter_shard
from pruner.jobfiles import JobFiles
from pruner.model.clip import open_clip_state
from pruner.model.loss import bank_loss
from pruner.scorer import Scorer, pick_curvature_samples, pick_shared_inputs
from pruner.scores.combine import INFLUENCE_COLUMNS, removal_prediction
from pruner.scores.propagation import lanczos_apply, phi
from pruner.scores.shared import reference_hvp, weighted_gradient


def read_uids(layout: JobLayout, spec: str) -> set[str]:
    """The uids to delete: ``dropped`` (the samples the job's selection drops), or a Parquet file with a ``uid``
    column (keep.parquet, a ranking filtered by hand, ...)."""
    if spec == "dropped":
        t = pq.read_table(layout.ranking, columns=["uid", "kept"])
        return set(t.filter(pc.invert(t["kept"]))["uid"].to_pylist())
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{spec} does not exist (fix: a Parquet file with a uid column, or 'dropped')")
    names = pq.read_schema(path).names
    if "uid" not in names:
        raise ValueError(f"{spec} has no uid column (columns: {names}) (fix: give the samples' uids in a column uid)")
    return set(pq.read_table(path, columns=["uid"])["uid"].to_pylist())


def predict(layout: JobLayout, uids: set[str]) -> dict:
    """{"n": samples found, "missing": uids not in the job, "predicted_change": {column: loss change}} from
    ranking.parquet (one pass, by row groups)."""
    pf = pq.ParquetFile(layout.ranking)
    cols = [c for c in INFLUENCE_COLUMNS if c in pf.schema_arrow.names]
    sums, found = dict.fromkeys(cols, 0.0), set()
    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, columns=["uid"] + cols).to_pydict()
        hit = np.array([u in uids for u in t["uid"]])
        found.update(np.asarray(t["uid"], object)[hit].tolist())
        for c in cols:
            sums[c] += float(np.nansum(np.asarray(t[c], np.float64)[hit]))
    return {"n": len(found), "missing": len(uids - found),
            "predicted_change": removal_prediction(sums, JobFiles(layout).pool_size())}


def _samples(cfg: JobConfig, layout: JobLayout, uids: set[str]):
    """The samples with these uids, read from the shards the ranking names for them."""
    t = pq.read_table(layout.ranking, columns=["uid", "shard_url"])
    urls = sorted(set(np.asarray(t["shard_url"].to_pylist(), object)[np.isin(t["uid"].to_pylist(), list(uids))]))
    return [s for url in urls for s in iter_shard(url, RejectLog(), allow_pipe=cfg.data.allow_pipe) if s.uid in uids]


def _flat(v: dict, names: Sequence[str]) -> torch.Tensor:
    return torch.cat([v[n].reshape(-1).double() for n in names])


def _unflat(x: torch.Tensor, like: dict) -> dict:
    out, i = {}, 0
    for n, t in like.items():
        out[n] = x[i:i + t.numel()].view(t.shape).to(t.dtype)
        i += t.numel()
    return out


def parameter_update(job_dir: str | Path, uids: set[str], lanczos_steps: int = 30,
                     device: str = "cpu") -> tuple[dict, torch.nn.Module, dict]:
    """(delta {parameter name: tensor} of the scored parameters, the last checkpoint's linearised model, diagnostics):
    module docstring."""
    job = JobFiles(job_dir)
    cfg, layout = job.config, job.layout
    form = cfg.scores.diffin.form
    if form not in ("propagated", "exact_increment"):
        raise ValueError(f"{job_dir}: the parameter update is written for Diff-In's propagated and exact_increment "
                         f"forms, not {form!r} (fix: run the job with scores.diffin.form: propagated)")
    traj = job.trajectory()
    scorer = Scorer(cfg, traj, device=device)
    states = [job.shared(i, scorer.device) for i in range(len(traj.checkpoints))]
    weights = job.checkpoint_records
    n_pool = job.pool_size()
    deleted = list(scorer.uid_batches(_samples(cfg, layout, uids)))
    pool = job.pool()
    if form == "propagated":
        curv = list(scorer.uid_batches(pick_curvature_samples(cfg, pool)))
    else:
        reference = pick_shared_inputs(cfg, pool, [], bank=False).reference
        ref_batches = [scorer.tensors(r) for r in reference]
    acc, diag = None, []
    for i, (engine, st, w) in enumerate(zip(scorer.engines, states, weights)):
        params = engine.params()
        names = list(params)
        g_s = weighted_gradient(engine, deleted, st)
        if form == "exact_increment":
            hv = reference_hvp(engine, ref_batches, st.scale, g_s, cfg.scores.diffin.hvp_eps)
            x = _flat(g_s, names) * float(w["b_t"]) + _flat(hv, names) * float(w["a_t"])
            acc = x if acc is None else acc + x
            diag.append({"checkpoint": i, "norm_g_S": float(_flat(g_s, names).norm())})
            continue
        n_sub = sum(b[0].shape[0] for b in curv)

        def fisher(v: torch.Tensor, engine=engine, st=st, names=names, params=params) -> torch.Tensor:
            """F v = (1/n) sum_i g_i <g_i, v> over the curvature subsample (exact dots, then one weighted backward)."""
            dirs = engine.directions([_unflat(v, {n: params[n] for n in names})])
            coeffs = []
            for images, tokens, u in curv:
                own = st.own_rows(u)
                r = engine.run(images, tokens, lambda a, b, o=own: bank_loss(a, b, st.bank_img, st.bank_txt, st.scale, o),
                               directions=dirs, features=False, norms=False)
                coeffs.append(r.dots[:, 0].float() / n_sub)
            return _flat(weighted_gradient(engine, curv, st, coeffs), names)

        h = float(w["eta"]) * st.step_scale
        b = float(w["b_t"]) * st.step_scale
        x = b * lanczos_apply(fisher, _flat(g_s, names), lambda e: phi(h * e), lanczos_steps)
        acc = x if acc is None else lanczos_apply(fisher, acc, lambda e: torch.exp(-h * e), lanczos_steps) + x
        diag.append({"checkpoint": i, "h": h, "norm_g_S": float(_flat(g_s, names).norm()), "norm_term": float(x.norm())})
    last = scorer.engines[-1]
    delta = _unflat(acc, {n: p for n, p in last.params().items()})
    v = _flat(states[-1].vectors["v_target"], list(last.params())) if "v_target" in states[-1].vectors else None
    return delta, last.model, {"form": form, "n": sum(b[0].shape[0] for b in deleted), "per_checkpoint": diag,
                               "norm_delta": float(acc.norm()), "n_pool": n_pool,
                               "step": traj.checkpoints[-1].step,
                               "first_order_target_change": None if v is None else float(v @ acc)}


def write_update(job_dir: str | Path, uids: set[str], out: str | Path, lanczos_steps: int = 30) -> dict:
    """theta_T + delta (:func:`parameter_update`) saved at ``out`` as an OpenCLIP training checkpoint (``epoch``,
    ``step``, ``name``, ``state_dict`` with open_clip's names); returns the diagnostics."""
    delta, model, diag = parameter_update(job_dir, uids, lanczos_steps)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, d in delta.items():
            params[n].add_(d.to(params[n].device))
    with atomic_path(Path(out)) as tmp:
        torch.save({"epoch": 1, "step": diag["step"], "name": "pruner-deletion",
                    "state_dict": open_clip_state(model)}, tmp)
    return diag
