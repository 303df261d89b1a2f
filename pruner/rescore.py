"""Incremental re-scoring (``pruner rescore``) of a finished job.

Three cases, each meant to give what a full re-run would give:

* **New shards in the lake**: nothing special: re-run ``pruner prune`` with the same config. The job id
  hashes the shard *specs* (a folder, a glob), not the expanded list, so the run reuses the job directory,
  scores only the new shards against the job's saved shared quantities (same bank, reference batches, OGA
  forest) and re-ranks everything.
* **New checkpoint** (:func:`add_checkpoint`): per-checkpoint components never depend on the other
  checkpoints (a_t and eta are applied when combining), so only the new checkpoint's shared quantities and
  components are computed, by the job's Ray actors as in a full run (the driver sends each actor the shard's
  stored score table); every score is then recombined over the longer trajectory, exactly as a full re-run
  would. The checkpoint must come after the existing ones (continued training), so the earlier checkpoints'
  learning-rate weights are unchanged. The earlier checkpoints' features and shared quantities are hard-linked
  into the new job directory (copied across filesystems).
* **New target set** (:func:`retarget`): from the stored projected features, without per-sample gradient
  passes. The new target gradient v' and u' = H_B v' are computed once per checkpoint and projected with the
  job's matrices; then TracIn ~ sum_t eta_t <P g_z, P v'> (and its prediction-score variant tracin_pred with
  P v'_pred, v_pred = -grad of the new target pairs' similarity) and Diff-In ~ sum_t b_t <P g_z, P v'> +
  a_t <P g_z, P u'> (form exact_increment) or sum_t a_t (<P g_z, P u'> + <P H_z G_B, P v'>) (form taylor,
  which needs ``features.save_hzg``) are matrix-vector products over the memory-mapped stored features. These are
  random-projection estimates of the exact dots a full re-run computes:
  unbiased, with error shrinking as 1/sqrt(k); the test reports their rank agreement with a full re-run.
  On a CPU the pass reads, by default, an int8 copy of each fp16 features file (one scale per row), built on first
  use under ``<job>/int8/`` and reused while the file is unchanged: about twice as fast (issue 8's >= 5M samples/s
  goal, benchmarks/RESULTS.md), adding an error of ~2e-4 of ||P g_z|| ||P v'|| per dot (median) to the
  projection's ~1/sqrt(k); ``--precision fp16`` reads the fp16 features instead.
  The per-checkpoint components of the old target (``c<i>_tracin_target``, ``c<i>_t1_target``,
  ``c<i>_tracin_pred``, ...) are dropped, not re-estimated.
  Every shard of the pool must be scored as it is now (the lake may have grown since the job ran): otherwise
  re-targeting is refused before any gradient pass, naming the shards. A job scored without a target set is
  ranked, once re-targeted, as a job with that target set is by default (:func:`retargeted_config`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pruner.config import JobConfig, SelectConfig, absolute_spec, default_score, load_config
from pruner.io.atomic import atomic_path, write_bytes_atomic
from pruner.io.layout import JobLayout, shard_identities
from pruner.io.store import Int8Copies, load_features
from pruner.jobfiles import JobFiles
from pruner.model.checkpoints import CheckpointInfo, load_trajectory, save_trajectory
from pruner.scorer import Scorer, pick_shared_inputs, propagation_terms, uses_propagation
from pruner.scores.combine import score_columns, target_set_columns
from pruner.scores.methods import BUILTIN, METHODS
from pruner.scores.shared import reference_hvp, target_gradients
from pruner.select.reduce import finalize


#: What a CPU re-target pass reads: "int8", the features' int8 copy (pruner.io.store.Int8Copies; the default: the
#: pass runs about twice as fast, benchmarks/RESULTS.md), or "fp16", the stored features themselves.
PRECISIONS = ("int8", "fp16")


def _of_target(column: str) -> bool:
    """Whether a score column depends on the target set: ``diffin_target``, ``tracin_target``, ``tracin_pred`` (its
    prediction-score variant, from v_pred of the same target samples) and their ``c<i>_`` components."""
    return column.endswith(("_target", "_pred"))


def _projected_dot(path: Path, vectors: torch.Tensor, chunk: int = 512, int8: Int8Copies | None = None) -> np.ndarray:
    """[n, j] float64 = the stored fp16 features [n, k] at ``path`` @ ``vectors`` [k, j] float32, fp32 accumulation.

    One streaming pass over the memory map (2 k bytes read per sample, 2 KiB at k = 1024). On the CPU,
    ``torch.get_num_threads()`` threads convert ``chunk``-row pieces into a reused fp32 buffer per thread (F16C;
    2 MiB at the defaults, cache-resident) and run one BLAS gemv per target vector on it (a gemm with 1-3
    columns is slower). On CUDA the fp16 rows cross the bus through pinned memory and are converted on the GPU.

    With ``int8`` (CPU only) the pass reads the file's int8 copy instead (:func:`_dot_int8`; made on first use):
    1 KiB per sample at k = 1024, about twice as fast."""
    if int8 is not None and not vectors.is_cuda:
        return _dot_int8(*int8.get(path), vectors).double().numpy()
    feats = torch.from_numpy(load_features(path, copy_on_write=True))
    vectors = vectors.float()
    out = _dot_cuda(feats, vectors) if vectors.is_cuda else _dot_cpu(feats, vectors, chunk)
    return out.double().numpy()


def _dot_int8(q: np.ndarray, scale: np.ndarray, vectors: torch.Tensor) -> torch.Tensor:
    """[n, j] float32 = (q [n, k'] int8 * scale [n, 1]) @ vectors [k, j] (zero-padded to k' rows, the copy's padded
    row length: pruner.io.store.quantize_rows), by ATen's int8-weight matmul (``torch._weight_int8pack_mm``,
    threaded over the rows; its fast CPU path takes bfloat16 activations, here the vectors): the vectors are rounded
    to bfloat16, the products accumulated in fp32, each dot rounded once to bfloat16 (relative 2^-9) and then scaled
    in fp32. Error against the fp16 rows' exact dots, with the int8 rounding (<= 1/254 of the row's largest
    magnitude per element): a median 2e-4 and at most ~1e-3 of ||row|| ||vector|| at k = 1024 (Gaussian rows;
    tests/test_rescore.py), against the random projection's own ~1/sqrt(k). Bitwise the same for any thread
    count."""
    n, k = q.shape[0], vectors.shape[0]
    if n == 0:
        return torch.zeros(0, vectors.shape[1])
    act = torch.zeros(vectors.shape[1], q.shape[1], dtype=torch.bfloat16)
    act[:, :k] = vectors.t()
    raw = torch._weight_int8pack_mm(act, torch.from_numpy(q), torch.ones(n, dtype=torch.bfloat16))  # [j, n]
    return raw.float().t() * torch.from_numpy(scale)[:, None]


@functools.lru_cache(maxsize=None)
def _thread_pool(threads: int) -> ThreadPoolExecutor:
    """One long-lived pool per thread count: a fresh pool per file (thread start, per-thread torch/BLAS setup)
    cost 0.2-1 ms here, 5-15% of the pass over a 10k-sample shard's features."""
    return ThreadPoolExecutor(threads, thread_name_prefix="rescore")


def _dot_cpu(feats: torch.Tensor, vectors: torch.Tensor, chunk: int) -> torch.Tensor:
    """[n, j] float32 = feats [n, k] fp16 @ vectors [k, j] fp32. Each thread takes the next unclaimed chunk (so a
    slower core does not hold up the pass) and converts it into its own fp32 buffer."""
    n, k = feats.shape
    threads = torch.get_num_threads()
    vt = vectors.t().contiguous()  # [j, k]
    out = torch.empty(vt.shape[0], n)  # [j, n]: each gemv writes a contiguous slice
    starts = itertools.count(0, chunk)  # next() is atomic under the GIL

    def work(_: int) -> None:
        buf = torch.empty(chunk, k)
        while (s := next(starts)) < n:
            e = min(n, s + chunk)
            b = buf[:e - s].copy_(feats[s:e])
            for i, v in enumerate(vt):
                torch.mv(b, v, out=out[i, s:e])

    # no intra-op threads inside the workers: they are created (and keep OpenMP's per-thread setting) while it is
    # 1, and MKL's setting is process-wide; the caller's setting is restored after the pass
    torch.set_num_threads(1)
    try:
        list(_thread_pool(threads).map(work, range(threads)))
    finally:
        torch.set_num_threads(threads)
    return out.t()


def _dot_cuda(feats: torch.Tensor, vectors: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """[n, j] float32 on the CPU = feats [n, k] fp16 @ vectors [k, j] (on the GPU): fp16 chunks are staged in two
    alternating pinned buffers (filling one while the other uploads) and converted to fp32 on the GPU."""
    n, k = feats.shape
    out = torch.empty(n, vectors.shape[1], device=vectors.device)
    staging = [torch.empty(chunk, k, dtype=torch.float16).pin_memory() for _ in range(2)]
    uploaded: list[torch.cuda.Event | None] = [None, None]
    for i, s in enumerate(range(0, n, chunk)):
        e, slot = min(n, s + chunk), i % 2
        if uploaded[slot] is not None:
            uploaded[slot].synchronize()  # this buffer's previous upload has finished: safe to overwrite
        rows = staging[slot][:e - s].copy_(feats[s:e]).to(vectors.device, non_blocking=True)
        uploaded[slot] = torch.cuda.Event()
        uploaded[slot].record(torch.cuda.current_stream(vectors.device))  # the stream the copy was queued on
        torch.mm(rows.float(), vectors, out=out[s:e])
    return out.cpu()


def retarget_shard(layout: JobLayout, url: str, n: int, projs: list[dict], diffin_form: str | None,
                   int8: Int8Copies | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One shard's new-target scores from its stored features: (tracin_target [n], diffin_target [n] or None,
    tracin_pred [n] or None) float64.

    Per checkpoint one pass over P g_z ([n, k] fp16, or its int8 copy from ``int8`` on a CPU:
    :func:`_projected_dot`) with P v', P u' (when ``diffin_form`` is given) and P v'_pred (when ``projs`` has it)
    and, in the taylor form, one pass over P H_z G_B with P v'; ``projs`` as :func:`target_projections` returns
    them."""
    pred = all("Pp" in p for p in projs)  # always, from target_projections; the benchmark also passes none
    tracin, diffin, tracin_pred = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, p in enumerate(projs):
        second = {"exact_increment": "Pu", "taylor": "Pu", "propagated": "Pw"}.get(diffin_form)
        vectors = [p["Pv"]] + ([p[second]] if second else []) + ([p["Pp"]] if pred else [])
        d = _projected_dot(layout.features(url, i), torch.stack(vectors, 1), int8=int8)
        tracin += p["eta"] * d[:, 0]
        if diffin_form == "propagated":  # w_t carries its weight
            diffin += d[:, 1]
        elif diffin_form == "exact_increment":
            diffin += p["b_t"] * d[:, 0] + p["a_t"] * d[:, 1]
        elif diffin_form == "taylor":
            diffin += p["a_t"] * (d[:, 1] + _projected_dot(layout.hzg(url, i), p["Pv"][:, None], int8=int8)[:, 0])
        if pred:
            tracin_pred += p["eta"] * d[:, -1]
    return tracin, diffin if diffin_form else None, tracin_pred if pred else None


def target_projections(job: JobFiles, target_specs: Sequence[str], device: str = "auto") -> list[dict]:
    """Per checkpoint: {"Pv": [k], "Pu": [k], "Pp": [k], "eta", "a_t", "b_t"} for a new target set (one pass over
    the target); Pp is P v_pred, the prediction-score target of tracin_pred. Like a full run, whatever the job's
    methods: the scorer forms tracin_target and tracin_pred whenever there is a target set."""
    cfg, traj = job.config, job.trajectory()
    scorer = Scorer(cfg, traj, device=device)
    states = [job.shared(i, scorer.device) for i in range(len(traj.checkpoints))]
    picked = pick_shared_inputs(cfg, job.pool(), job.shard_urls(target_specs), bank=False)
    target_samples, reference = picked.target, picked.reference
    target_batches = list(scorer.uid_batches(target_samples))
    ref_batches = [scorer.tensors(r) for r in reference]
    # the weights the job's other columns were combined with, as trajectory.json records them (a job scored before a
    # change of the weighting rule keeps its own; every job whose shared states load above records b_t)
    weights = [{key: float(r[key]) for key in ("eta", "a_t", "b_t")} for r in job.checkpoint_records]
    propagated = uses_propagation(cfg)
    out = []
    for i, (engine, shared) in enumerate(zip(scorer.engines, states)):
        v, v_pred = target_gradients(engine, [(x, t) for x, t, _ in target_batches],
                                     (shared.bank_img, shared.bank_txt), shared.scale,
                                     [shared.own_rows(u) for _, _, u in target_batches])
        proj = engine.projector
        out.append({"Pv": proj.project_weights(v).float(), "Pp": proj.project_weights(v_pred).float(), **weights[i]})
        if propagated:  # the new target's projected gradient replaces the old one in the shared quantities
            shared.projected = {**shared.projected, "target": out[-1]["Pv"]}
        else:
            out[-1]["Pu"] = proj.project_weights(reference_hvp(engine, ref_batches, shared.scale, v,
                                                               cfg.scores.diffin.hvp_eps)).float()
    if propagated:  # Diff-In's k-vectors w_t for the new target (pruner.scorer.propagation_terms)
        for p, terms in zip(out, propagation_terms(states, scorer.weights, ["target"])):
            p["Pw"] = terms["prop_directions"]["target"].float()
    return out


def retarget(job_dir: str | Path, target_specs: Sequence[str], device: str = "auto",
             precision: str = "int8") -> Path:
    """Re-score a finished job for a new target set into ``<job>/retarget-<hash>/`` and rank by it there.
    ``precision``: the stored features' copy the CPU pass reads (:data:`PRECISIONS`; on CUDA always fp16)."""
    job = JobFiles(job_dir)
    cfg, layout = job.config, job.layout
    # the new job's config.yaml is read back relative to its own folder: relative specs are made absolute here
    target_specs = [absolute_spec(s, Path.cwd()) for s in target_specs]
    if cfg.select.needs_features:
        raise ValueError(f"{job_dir}: select.policy {cfg.select.policy!r} / gradient-space dedup reads stored "
                         f"features, which a re-targeted job does not have (not supported yet; fix: select.policy "
                         f"class_balanced or top_k with dedup_space embedding, or re-run the job with the new "
                         f"target)")
    plugins = [m for m in cfg.scores.methods if m not in BUILTIN and METHODS[m].target_set_columns]
    if plugins:
        raise ValueError(f"{job_dir}: the plug-in method(s) {plugins} score against the target set, which a "
                         f"re-target does not recompute (fix: re-run the job with the new target)")
    pool = job.pool()
    missing, changed = layout.stale_shards(pool, shard_identities(pool))
    problems = [f"{len(urls)} shard(s) {what}: {', '.join(urls[:3])}{' ...' if len(urls) > 3 else ''}"
                for urls, what in ((missing, "were never scored by the job (the lake grew since it ran)"),
                                   (changed, "changed since the job scored them")) if urls]
    if problems:  # refused before any gradient pass or output: re-targeting reads every shard's stored features
        raise ValueError(f"{job_dir}: cannot re-target, {'; '.join(problems)} (fix: re-run the job first, "
                         f"`pruner prune --config {layout.config}`, so it scores them; then re-target)")
    if precision not in PRECISIONS:  # before any gradient pass
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    projs = target_projections(job, target_specs, device)
    use_int8 = precision == "int8" and not projs[0]["Pv"].is_cuda  # what the pass reads names the output
    tag = hashlib.sha256(json.dumps([sorted(target_specs), "int8" if use_int8 else "fp16"]).encode()).hexdigest()[:12]
    new = layout.retarget(tag)
    new.shards_dir.mkdir(parents=True, exist_ok=True)
    form = cfg.scores.diffin.form
    has_hzg = all(layout.hzg(pool[0], i).exists() for i in range(len(projs)))
    diffin_form = form if ("diffin" in cfg.scores.methods and (form != "taylor" or has_hzg)) else None
    with Int8Copies(layout.int8_dir) if use_int8 else contextlib.nullcontext() as int8:
        for url in tqdm(pool, desc="re-target", unit="shard", dynamic_ncols=True):
            _retarget_file(layout, new, url, projs, diffin_form, int8)
    kept = job.summary().get("counts", {}).get("kept") if cfg.select.threshold is not None else None
    cfg2 = retargeted_config(cfg, target_specs, diffin_form, kept)
    write_bytes_atomic(new.config, cfg2.to_yaml())  # read by the reduce step (trusted pipe: commands)
    write_bytes_atomic(new.trajectory, layout.trajectory.read_bytes())  # the weights its scores are combined with
    finalize(cfg2, new, pool, {"retarget_of": str(layout.root), "projected_estimates": True,
                               "diffin_available": diffin_form is not None,
                               "features_read": "int8" if use_int8 else "fp16"})
    return new.root


def retargeted_config(cfg: JobConfig, target_specs: Sequence[str], diffin_form: str | None,
                      kept: int | None = None) -> JobConfig:
    """The re-targeted job's config: the new target set, and the select settings it ranks by.

    A job with a target set keeps its select settings (diffin_target becomes tracin_target where Diff-In's form
    cannot re-target), and so does a job without one whose select settings are not what ``auto`` resolves to there
    (a score, filter or niche setting the user chose). A job scored without a target set and ranked the default way
    (``select.score`` auto, no filter stage) is re-targeted to ask which samples help the new target, so it ranks as
    a job with that target set does by default: ``score``, ``filter_score`` and ``niche_alpha`` at their defaults,
    resolved over the columns the re-target writes (diffin_target where ``diffin_form``; the filter stage where the
    job has the target-free score). Its budget stays: a ``threshold`` (a cut on the old score's scale) becomes
    ``keep_count`` = ``kept``, the number the job kept. Where the job has no target-set score to rank by (neither
    TracIn nor a Diff-In form that re-targets), it keeps its settings."""
    kept_settings = cfg.model_copy(update={
        "target": cfg.target.model_copy(update={"shards": list(target_specs)}),
        "select": cfg.select.model_copy(update={
            "score": cfg.select.score if (diffin_form or cfg.select.score != "diffin_target") else "tracin_target"})})
    free_default = default_score(score_columns(cfg.scores.methods, cfg.scores.diffin.targets, False))
    if cfg.target.shards or cfg.select.score != free_default or cfg.select.filter_score is not None:
        return kept_settings
    data = cfg.model_dump(mode="json")
    data["target"]["shards"] = list(target_specs)
    targets = data["scores"]["diffin"]["targets"]
    if diffin_form and "target" not in targets:
        targets.insert(0, "target")
    data["select"].update({key: SelectConfig.model_fields[key].default
                           for key in ("score", "filter_score", "niche_alpha")})
    if cfg.select.threshold is not None:
        data["select"].update(threshold=None, keep_count=max(1, kept or 0))
    new = load_config(data=data, check_paths=False)
    return new if new.select.score in target_set_columns() else kept_settings


def _retarget_file(layout: JobLayout, new: JobLayout, url: str, projs: list[dict], diffin_form: str | None,
                   int8: Int8Copies | None) -> None:
    """Write one shard's re-targeted score file (and a copy of its rejects) into the job ``new``."""
    table = pq.read_table(layout.scores(url))
    tracin, diffin, tracin_pred = retarget_shard(layout, url, table.num_rows, projs, diffin_form, int8)
    # the old target's columns go: the method scores are recomputed, their c<i>_ components are not
    cols = {c: table[c] for c in table.column_names if not _of_target(c)}
    cols["tracin_target"] = pa.array(tracin)
    if diffin_form:
        cols["diffin_target"] = pa.array(diffin)
    if tracin_pred is not None:
        cols["tracin_pred"] = pa.array(tracin_pred)
    with atomic_path(new.scores(url)) as tmp:
        pq.write_table(pa.table(cols), tmp)
    if layout.rejects(url).exists() and not new.rejects(url).exists():
        with atomic_path(new.rejects(url)) as tmp:
            tmp.write_bytes(layout.rejects(url).read_bytes())


def add_checkpoint(job_dir: str | Path, checkpoint: str, step: int | None = None, lr: float | None = None,
                   lr_mean: float | None = None) -> Path:
    """Extend a finished job's trajectory by one later checkpoint; returns the new job directory.

    A prune job over the longer trajectory that reuses the finished one (``prior`` of :func:`pruner.jobs.prune.run`,
    checked by pruner.jobs.resume): the scoring actors load and compute only the new checkpoint and combine its
    components with the stored ones, so the result equals a full re-run on the longer trajectory. Resumable like any
    job: re-running the same command finishes an interrupted extension."""
    from dataclasses import replace

    from pruner.jobs.prune import run

    job = JobFiles(job_dir)
    cfg, layout = job.config, job.layout
    if uses_propagation(cfg):
        raise ValueError(f"{job_dir}: Diff-In's propagated form carries the last checkpoint's target gradient back "
                         f"through every earlier interval, so a later checkpoint changes every checkpoint's term, "
                         f"not only its own: extending the job would rescore it all (fix: run a full job with the "
                         f"longer trajectory, or use scores.diffin.form: exact_increment for jobs extended this way)")
    old = job.trajectory()
    done = tuple(CheckpointInfo(c["path"], c["step"], c["lr"], c["lr_mean"])  # what the job scored, as it recorded it
                 for c in job.checkpoint_records)
    info = load_trajectory(checkpoints=[checkpoint]).checkpoints[0]
    info = replace(info, step=step if step is not None else info.step, lr=lr if lr is not None else info.lr,
                   lr_mean=lr_mean if lr_mean is not None else info.lr_mean)
    if info.step <= done[-1].step:
        raise ValueError(f"checkpoint {checkpoint} (step {info.step}) must come after the job's last checkpoint "
                         f"(step {done[-1].step}) (fix: pass --step)")
    longer = replace(old, checkpoints=done + (info,), arch=old.arch or cfg.model.arch)
    digest = hashlib.sha256(json.dumps([c.record() for c in longer.checkpoints]).encode()).hexdigest()[:12]
    traj_file = save_trajectory(longer, Path(cfg.output_dir) / "trajectories" / f"{cfg.name}-{digest}.json")
    cfg2 = cfg.model_copy(update={"trajectory": cfg.trajectory.model_copy(update={"file": str(traj_file),
                                                                                 "checkpoints": []})})
    status, summary = run(cfg2, prior=layout)
    new = Path(cfg2.output_dir) / summary["job"]
    if status:
        url, err = next(iter(summary["shards_failed"].items()))
        raise RuntimeError(f"adding {checkpoint} to {job_dir}: {len(summary['shards_failed'])} shard(s) failed, all "
                           f"listed in {new / 'failed.json'}; the first, {url}: {err[:500]}")
    return new
