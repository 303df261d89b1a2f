"""Quality benchmark: does pruning find bad pairs and build better coresets?

    .venv/bin/python benchmarks/quality.py                       # reduced size, 3 seeds, Ray service
    .venv/bin/python benchmarks/quality.py --seeds 1             # the documented one-seed CPU run (~1 h on 2 cores)
    .venv/bin/python benchmarks/quality.py --no-ray --device cuda --seeds 3 --pool-size 20000 --arch pruner-tiny

Problem (per seed, everything seeded by it): a class-stratified pool of ``--pool-size`` real CIFAR-10 training
images (shared/data/cifar10) with their synthetic captions; the captions of ``--noise`` (20%) of the pairs are
permuted among themselves so that every swapped caption names a different class (ground truth kept). The noisy
pool is written as new tar shards in the work directory. The target set V of Diff-In/TracIn is a clean,
class-balanced, HELD-OUT SLICE OF THE TRAIN SPLIT (``--target-size`` pairs, disjoint from the pool); the
evaluation uses the TEST split only, so target and evaluation images never overlap.

Pipeline: train the proxy (pruner.train.proxy.train_proxy = ``pruner train-proxy``, open_clip_train, AdamW,
warm-up + cosine, ``--checkpoints`` evenly spaced checkpoints); score the pool with every method through the Ray
service (pruner.jobs.prune.run), or by the job's local runner in this process under ``--no-ray``; then

(a) detection: AUROC / average precision (positive = swapped, suspiciousness = -score) and the share of swapped
    pairs among the lowest-ranked 10/20/30%; per image class (and by class frequency with ``--rare-classes``).
(b) coresets: keep 50% / 30% by each method, retrain the same architecture from scratch for the same number of
    steps with train_proxy on shards of the kept pairs (same seed), and report zero-shot top-1 on the test split
    (classnames.json templates, averaged text embeddings) and retrieval recall@1/@5 on ``--retrieval-size`` test
    pairs. A retrieval hit means the retrieved caption TEXT equals the paired caption text (captions are one of
    100 synthetic strings, so even a perfect class model hits i2t R@1 only ~10% of the time); class-level hits are
    reported as well. References: the full noisy pool (= the proxy) and the clean pairs only (oracle filter).
    With ``--policies``, the selection policies of pruner.select.policies are coreset methods too, named
    ``<score>:<policy>`` (cluster_balanced: the same share of every gradient cluster; class_balanced: of every image
    class; top_k_dedup: the global top-k after greedy near-duplicate removal), each ranking by the
    ``--policy-scores``, evaluated exactly like the plain top-k coresets (one extra prune job with
    features.save provides the stored gradient features they need).
(c) counterfactual fidelity: the pool is split at random into ``--groups`` disjoint groups of
    ``--group-fraction`` of the pool; each is removed and the model retrained (same seed and steps). Actual effect
    = target loss(retrained without the group) - target loss(proxy), where the target loss is the mean over V of
    pruner.model.loss.bank_loss against the prune job's fixed bank pairs, embedded by the evaluated model (the mean
    in-batch loss over fixed target batches is reported too). Spearman with the group-summed diffin_target and
    tracin_target scores (removal convention: positive = removing raises the loss).
(d) data deletion: for selections D (Diff-In's 50% selection, its lowest ``--deletion-drop`` share, one random
    group) the predicted change (sum of influences over D; the job summary's
    predicted_target_loss_change_from_dropped), the actual change from retraining without D, and the target loss
    of theta_T + sum_{z in D} I_theta(z) (Diff-In's parameter influence, see quality_lib.diffin_parameter_update).

Results: ``--out`` (default benchmarks/results/quality.json, written atomically) and a markdown table on stdout.
Retraining runs, scores and evaluations are cached in ``--work-dir`` (keyed by the settings), so an interrupted
run resumes. CPU runs use ``--threads`` (default 1) torch threads: on a small shared CPU more threads are slower.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import quality_lib as ql  # noqa: E402
from pruner.config import TARGET_FREE_SCORE  # noqa: E402

log = logging.getLogger("quality")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality.json"
ALL_METHODS = ["diffin_target", "diffin_train", "diffin_self", "tracin_target", "tracin_self", "oga_iforest",
               "oga_l1", "oga_l2", "baseline_clip_score", "baseline_loss", "baseline_random"]
DETECT_EXTRA = ["tracin_pred"]
INFLUENCE = ["diffin_target", "tracin_target"]
BASELINES = ["baseline_clip_score", "baseline_loss", "baseline_random"]
# coreset method -> (pruner.select.policies policy, with near-duplicate removal); class = the json "label" of the
# pool shards, i.e. the image's CIFAR-10 class (a label the pool really carries; captions may be swapped)
POLICY_METHODS = {"cluster_balanced": ("cluster_balanced", False), "class_balanced": ("class_balanced", False),
                  "top_k_dedup": ("top_k", True)}


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="CIFAR-10 WebDataset (train/, test/, classnames.json)")
    p.add_argument("--work-dir", help="cache of shards, runs and scores (default: $TMPDIR/pruner-quality/<settings hash>)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="result JSON")
    p.add_argument("--seeds", default="3", help="a count (3 -> seeds 0,1,2) or a comma list of seeds (\"2,\" = seed 2 alone)")
    p.add_argument("--train-shards", type=int, default=0, help="read only the first N train shards (0 = all 25; "
                   "toy runs)")
    p.add_argument("--test-shards", type=int, default=0, help="read only the first N test shards (0 = all 5)")
    p.add_argument("--pool-size", type=int, default=5000)
    p.add_argument("--target-size", type=int, default=512, help="held-out clean slice of the train split (V)")
    p.add_argument("--noise", type=float, default=0.2, help="share of pairs whose captions are swapped across classes")
    p.add_argument("--rare-classes", type=int, default=0, help="seeded classes made rare in the pool (0: balanced)")
    p.add_argument("--rare-weight", type=float, default=0.25, help="a rare class's share relative to a frequent one")
    p.add_argument("--arch", default="pruner-micro")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps of the proxy and of every retraining")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR (pruner-micro, 300 steps, seed 0: 1e-3 gave 28.1%% "
                   "zero-shot vs 24.4%% at 3e-4)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="proxy and retraining optimiser "
                   "(Diff-In's theory assumes SGD)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (with --optimizer sgd)")
    p.add_argument("--checkpoints", type=int, default=3, help="evenly spaced proxy checkpoints")
    p.add_argument("--keep-fractions", default="0.5,0.3")
    p.add_argument("--coreset-methods", default=",".join(ALL_METHODS), help="comma list ('none' for no coresets)")
    p.add_argument("--balanced-methods", default="diffin_target,diffin_train,tracin_target,baseline_loss",
                   help="investigation: also keep the top share within each caption class (the class the caption "
                        "names) by these methods ('none' to skip)")
    p.add_argument("--balanced-keep", default="0.5", help="keep fractions of the class-balanced coresets")
    p.add_argument("--policies", default="none", help="selection policies (pruner.select.policies) as coreset methods "
                   f"<score>:<policy>, at every --keep-fractions: comma list of {','.join(POLICY_METHODS)} ('none' "
                   "to skip); they need a prune job run with features.save (one extra scoring pass, Ray)")
    p.add_argument("--policy-scores", default="diffin_target,baseline_loss", help="scores the policies rank by")
    p.add_argument("--policy-clusters", type=int, default=10, help="gradient clusters of cluster_balanced")
    p.add_argument("--dedup-threshold", type=float, default=0.98, help="cosine above which top_k_dedup drops a "
                   "sample as a near-duplicate of a better-ranked one (seed-0 pool of 5000, gradient space: 16%% of "
                   "the samples have a neighbour above 0.98, 2%% above 0.99)")
    p.add_argument("--dedup-space", default="gradient", choices=["gradient", "embedding"])
    p.add_argument("--groups", type=int, default=20, help="counterfactual groups (0: skip (c))")
    p.add_argument("--group-fraction", type=float, default=0.05)
    p.add_argument("--deletion-drop", type=float, default=0.1, help="(d): also drop this lowest-ranked share (0: skip)")
    p.add_argument("--no-deletion", action="store_true", help="skip (d)")
    p.add_argument("--noise-runs", type=int, default=1, help="full-pool retrainings with other seeds (noise floor of (c))")
    p.add_argument("--eval-size", type=int, default=5000, help="test images for zero-shot (seeded subset; 0 = all)")
    p.add_argument("--retrieval-size", type=int, default=1000, help="test pairs for retrieval recall")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1 is fastest on a busy 2-core box)")
    p.add_argument("--no-ray", action="store_true", help="score by the job's local runner (pruner prune --local): no Ray")
    p.add_argument("--actors", type=int, default=2, help="Ray scoring actors (CPU)")
    p.add_argument("--bank-size", type=int, default=1024)
    p.add_argument("--k", type=int, default=1024, help="projected gradient dimension (OGA)")
    p.add_argument("--reference-batch-size", type=int, default=128)
    p.add_argument("--fd-eps", type=float, default=1e-2)
    p.add_argument("--hvp-eps", type=float, default=1e-2)
    p.add_argument("--self-rank", type=int, default=4)
    p.add_argument("--loss", default="bank", choices=["bank", "in_batch"], help="per-sample loss of the scores")
    p.add_argument("--diffin-form", default="taylor", choices=["taylor", "exact_increment", "propagated"],
                   help="scores.diffin.form of the scoring job (default taylor: the form the recorded table and the "
                        "deletion check's parameter update (d) measure; with exact_increment run --no-deletion)")
    p.add_argument("--filter-fraction", type=float, default=0.2, help="default_score: the default pipeline's filter "
                   "stage (select.filter_fraction) by pruner.config.TARGET_FREE_SCORE, then diffin_target")
    p.add_argument("--niche-alpha", type=float, default=1e-3, help="default_score: the niche test's level "
                   "(select.niche_alpha; applies to the propagated form)")
    p.add_argument("--ablations", default="", help="comma list of rescoring ablations for Diff-In detection: "
                   "in_batch_loss, fd_eps_1e-3, fd_eps_1e-1, hvp_eps_1e-3, last_checkpoint (on a subsample)")
    p.add_argument("--ablation-samples", type=int, default=1500)
    p.add_argument("--partial-out", help="also write the seed's partial results here after every phase")
    p.add_argument("--keep-work", action="store_true", help="keep retrained checkpoints (default: weights deleted "
                   "after evaluation; results stay cached)")
    a = p.parse_args(argv)
    a.seed_list = ([int(s) for s in a.seeds.split(",") if s.strip()] if "," in a.seeds else list(range(int(a.seeds))))
    a.keep_list = [float(f) for f in a.keep_fractions.split(",") if f]
    a.coreset_list = [] if a.coreset_methods in ("", "none") else a.coreset_methods.split(",")
    a.ablation_list = [x for x in a.ablations.split(",") if x]
    a.balanced_list = [] if a.balanced_methods in ("", "none") else a.balanced_methods.split(",")
    a.balanced_keep_list = [float(f) for f in a.balanced_keep.split(",") if f]
    a.policy_list = [] if a.policies in ("", "none") else a.policies.split(",")
    a.policy_score_list = [x for x in a.policy_scores.split(",") if x]
    unknown = set(a.policy_list) - set(POLICY_METHODS)
    if unknown:
        p.error(f"--policies: unknown {sorted(unknown)} (choose from {list(POLICY_METHODS)})")
    if a.diffin_form != "taylor" and not a.no_deletion:  # (d)'s update is the taylor form's (quality_lib)
        p.error("--diffin-form exact_increment needs --no-deletion: the deletion check's parameter update "
                "(quality_lib.diffin_parameter_update) is the taylor form's")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


RESULT_SETTINGS = ("data_dir", "train_shards", "test_shards", "pool_size", "target_size", "noise", "rare_classes",
                   "rare_weight", "arch", "steps", "batch_size", "lr", "optimizer", "momentum", "checkpoints",
                   "group_fraction", "groups", "deletion_drop", "eval_size", "retrieval_size", "bank_size", "k",
                   "reference_batch_size", "fd_eps", "hvp_eps", "self_rank", "loss", "device")


def settings_hash(a) -> str:
    """The work directory's key. The Diff-In form enters it only when it is not taylor, so the work directories of
    runs from before the option keep their key; another form gets its own directory (its scores, and the coreset,
    deletion and ablation runs named after Diff-In methods, differ)."""
    settings = {k: getattr(a, k) for k in RESULT_SETTINGS}
    if a.diffin_form != "taylor":
        settings["diffin_form"] = a.diffin_form
    return ql.settings_hash(settings)


# ---------------------------------------------------------------------------------------------------------------
def job_config(a, seed: int, seed_dir: Path, traj: Path, pool_dir: Path, target_dir: Path, **over) -> dict:
    cfg = {
        "name": "quality", "output_dir": str(seed_dir / "jobs"), "seed": seed,
        "data": {"shards": [str(pool_dir)]},
        "target": {"shards": [str(target_dir)], "max_samples": a.target_size},
        "model": {"arch": a.arch, "device": a.device},
        "trajectory": {"file": str(traj)},
        "features": {"k": a.k, "bank_size": a.bank_size, "batch_size": 64, "save": False, "loss": a.loss},
        "scores": {"methods": ["diffin", "tracin", "oga", "baselines"],
                   "diffin": {"form": a.diffin_form, "targets": ["target", "train", "self"], "fd_eps": a.fd_eps,
                              "hvp_eps": a.hvp_eps,
                              "reference_batch_size": a.reference_batch_size, "self_rank": a.self_rank},
                   "oga": {"iforest_sample": min(2000, a.pool_size)}},
        "select": {"score": "diffin_target", "keep_fraction": 0.5},
        "ray": {"num_actors": a.actors, "cpus_per_actor": 1},
    }
    for k, v in over.items():
        sec, _, name = k.partition("__")
        cfg[sec][name] = v
    return cfg


def job_inputs(cfg):
    """The bank, reference batches and target samples exactly as the prune job's SharedComputer picks them."""
    pool, picked = job_shared_inputs(cfg)
    return pool, picked.bank, picked.reference, picked.target


def job_shared_inputs(cfg):
    """(pool shard urls, pruner.scorer.SharedInputs): every shared-phase sample exactly as the prune job picks them,
    with Diff-In's curvature subsample when its form uses one."""
    from pruner.io.shards import expand_shard_specs
    from pruner.scorer import pick_shared_inputs, uses_propagation
    pool = expand_shard_specs(cfg.data.shards)
    return pool, pick_shared_inputs(cfg, pool, expand_shard_specs(cfg.target.shards),
                                    curvature=uses_propagation(cfg), oga="oga" in cfg.scores.methods)


def score_subset(cfg, traj, device, subset_uids):
    """Every score column of the pool samples in ``subset_uids`` (an ablation's sample), from the job's own scorer
    in this process (pruner.distributed.local.LocalScoring: the job's shared stage, then its Scorer)."""
    from pruner.distributed.local import LocalScoring
    from pruner.io.shards import expand_shard_specs
    from pruner.scorer import iter_pool
    pool = expand_shard_specs(cfg.data.shards)
    local = LocalScoring(cfg, traj, pool, expand_shard_specs(cfg.target.shards), device=device)
    local.shared_stage()
    samples = [s for s in iter_pool(pool) if s.uid in subset_uids]
    cols: dict[str, list] = {}
    for i in range(0, len(samples), 500):
        c, _ = local.scorer.score(samples[i:i + 500])
        for k, v in c.items():
            cols.setdefault(k, []).append(v)
    out = {k: np.concatenate(v) for k, v in cols.items()}
    out["uid"] = np.array([s.uid for s in samples])
    return out


def run_prune_job(cfg, local: bool = False):
    """Run (or resume) the prune job (pruner.jobs.prune.run): through the Ray service (a private local Ray), or
    with ``local`` by the local runner in this process. Returns (job layout, trajectory, summary)."""
    from pruner.jobs.jobdir import prepare
    from pruner.jobs.prune import run
    for k, v in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"),
                 ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")):
        os.environ.setdefault(k, v)
    status, summary = run(cfg, local=local)
    try:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    if status != 0:
        raise RuntimeError(f"prune job failed with status {status}: {json.dumps(summary)[:2000]}")
    layout, _, _, traj = prepare(cfg)
    return layout, traj, summary


def score_job(cfg, local: bool = False):
    """(score columns by name plus ``uid``, shared quantities per checkpoint, (step, eta, a_t) per checkpoint, the
    job's summary) of the prune job, run by :func:`run_prune_job`."""
    import pyarrow.parquet as pq
    from pruner.scores.combine import RANKING_COLUMNS, SAMPLE_COLUMNS
    from pruner.scores.shared import CheckpointShared
    layout, traj, summary = run_prune_job(cfg, local)
    t = pq.read_table(layout.ranking).to_pydict()
    cols = {k: np.asarray(v, np.float64) for k, v in t.items() if k not in SAMPLE_COLUMNS + RANKING_COLUMNS}
    cols["uid"] = np.asarray(t["uid"])
    shared = [CheckpointShared.load(layout.shared(i)) for i in range(len(traj.checkpoints))]
    tj = json.loads(layout.trajectory.read_text())
    weights = [(c["step"], c["eta"], c["a_t"]) for c in tj["checkpoints"]]
    return cols, shared, weights, summary


def cached_scores(a, cfg, traj, seed_dir: Path):
    """Score columns aligned to pool order are saved in seed_dir/scores/ (npz + shared states + meta)."""
    from pruner.scores.shared import CheckpointShared
    sd = seed_dir / "scores"
    meta_p = sd / "meta.json"
    if meta_p.exists():
        meta = json.loads(meta_p.read_text())
        z = np.load(sd / "columns.npz", allow_pickle=False)
        cols = {k: z[k] for k in z.files}
        shared = [CheckpointShared.from_state(torch.load(sd / f"shared-{i}.pt", map_location="cpu", weights_only=True))
                  for i in range(meta["checkpoints"])]
        return cols, shared, [tuple(w) for w in meta["weights"]], meta
    t0 = time.time()
    cols, shared, weights, summary = score_job(cfg, local=a.no_ray)
    sd.mkdir(parents=True, exist_ok=True)
    np.savez(sd / "columns.npz", **cols)
    for i, s in enumerate(shared):
        torch.save(s.to_state(), sd / f"shared-{i}.pt")
    meta = {"checkpoints": len(shared), "weights": [list(w) for w in weights], "seconds": time.time() - t0,
            "service": "pruner.jobs.prune.run, " + ("local runner" if a.no_ray else "Ray"),
            "predicted_target_loss_change_from_dropped":
                (summary or {}).get("predicted_target_loss_change_from_dropped"),
            "job_selection": (summary or {}).get("selection")}
    ql.write_json(meta_p, meta)
    return cols, shared, weights, meta


def policy_coresets(a, cfg_dict: dict, keys: list) -> dict:
    """{(method "<score>:<policy>", keep fraction): (pool indices kept [K], policy summary without "keep")} for
    --policies x --policy-scores x --keep-fractions, from pruner.select.policies.select_policy on the prune job of
    ``cfg_dict`` re-run with features.save (clustering and gradient dedup read the stored features). Its scores
    equal the cached columns up to scoring round-off (the configs differ only in features.save); the result's
    ``policy_selection`` records each keep set's overlap with the plain top-k of the cached columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pruner.config import load_config
    from pruner.select.policies import select_policy
    cfg_dict = json.loads(json.dumps(cfg_dict))
    cfg_dict["features"]["save"] = True
    layout, _, _ = run_prune_job(load_config(data=cfg_dict, check_paths=False))
    files = [f for f in layout.score_files() if pq.read_metadata(f).num_rows]
    uid_of_id = pa.concat_tables([pq.read_table(f, columns=["uid"]) for f in files])["uid"]
    uid_of_id = uid_of_id.to_numpy(zero_copy_only=False)  # sample id -> uid, the order of select_policy's mask
    pos = {k: i for i, k in enumerate(keys)}
    out = {}
    for score in a.policy_score_list:
        for name in a.policy_list:
            policy, dedup = POLICY_METHODS[name]
            for f in a.keep_list:
                sm = select_policy(layout.root, policy, score, keep_fraction=f, n_clusters=a.policy_clusters,
                                   label_key="label", dedup_threshold=a.dedup_threshold if dedup else None,
                                   dedup_space=a.dedup_space, seed=cfg_dict["seed"], write=False)
                idx = np.sort(np.array([pos[u] for u in uid_of_id[sm.pop("keep")]]))
                out[f"{score}:{name}", f] = (idx, sm)
    return out


# ---------------------------------------------------------------------------------------------------------------
class Runner:
    """Cached retraining + evaluation of one seed's runs."""

    def __init__(self, a, seed: int, seed_dir: Path, ev: ql.EvalSet, probe: ql.LossProbe, pool_by_key: dict):
        self.a, self.seed, self.seed_dir, self.ev, self.probe = a, seed, seed_dir, ev, probe
        self.pool_by_key = pool_by_key
        self.train_seconds: list[float] = []

    def result(self, name: str, keys, seed=None, evaluate=True, run_dir=None) -> dict:
        a = self.a
        rd = run_dir or (self.seed_dir / "runs" / name)
        res_p = rd / "result.json"
        want = {"keys": ql.keyset_hash(keys), "evaluate": evaluate}
        if res_p.exists():
            res = json.loads(res_p.read_text())
            if res.get("keys") == want["keys"] and (res.get("evaluate") or not evaluate):
                return res
            if run_dir is None and res.get("keys") != want["keys"]:
                # a run of another key set under this name (e.g. the scores changed): its weights were deleted after
                # evaluation, so retrain from scratch rather than reuse its trajectory
                shutil.rmtree(rd)
        t0 = time.time()
        if not (rd / "trajectory.json").exists():
            samples = [self.pool_by_key[k] for k in keys]
            ql.train_run(rd, samples, arch=a.arch, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                         seed=self.seed if seed is None else seed, device=a.device, optimizer=a.optimizer,
                         momentum=a.momentum)
            self.train_seconds.append(time.time() - t0)
        model = ql.load_model(ql.last_checkpoint(rd), a.arch, a.device)
        res = {**want, "n": len(keys), "train_seconds": time.time() - t0,
               "target_loss": ql.target_losses(model, self.probe, a.device)}
        if evaluate:
            res.update(ql.evaluate(model, self.ev, a.device))
        ql.write_json(res_p, res)
        if run_dir is None and not a.keep_work:
            for p in (rd / "train" / "checkpoints").glob("*.pt"):
                p.unlink()
        log.info("run %s: %d samples, %s, %.0f s", name, len(keys),
                 {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                  if k in ("zero_shot",)} | {"target_loss": round(res["target_loss"]["bank"], 4)}, time.time() - t0)
        return res


def save_partial(a, seed_dir: Path, res: dict, timings: dict) -> None:
    """The seed's results so far (phases run in the order a, b, d, c), for runs that may be cut off."""
    res["timings"] = dict(timings)
    ql.write_json(seed_dir / "partial.json", res)
    if a.partial_out:
        ql.write_json(Path(a.partial_out), {"per_seed": [res], "config": None, "partial": True})


def keep_indices(score, uids, frac) -> np.ndarray:
    k = int(math.floor(frac * len(score) + 1e-9))
    return ql.rank_order(score, uids)[:k]


def free_diagnostics(cols, weights, swapped, uids, caption_class=None) -> dict:
    """Detection AUROC of Diff-In / TracIn variants recomputed from the per-checkpoint component columns (no
    rescoring): T1 (H_B g term) or T2 (H_z G term) alone, single checkpoints, equal checkpoint weights."""
    from sklearn.metrics import roc_auc_score
    m = len(weights)
    a_ts = [w[2] for w in weights]
    out = {}

    def au(score):
        s = np.asarray(score, np.float64)
        if not np.isfinite(s).all():
            return float("nan")
        return float(roc_auc_score(swapped, -s))

    for tgt in ("target", "train", "self"):
        if all(f"c{i}_t1_{tgt}" in cols and f"c{i}_t2_{tgt}" in cols for i in range(m)):  # the taylor form
            t1 = [cols[f"c{i}_t1_{tgt}"] for i in range(m)]
            t2 = [cols[f"c{i}_t2_{tgt}"] for i in range(m)]
            out[f"diffin_{tgt}:T1_only"] = au(sum(a * x for a, x in zip(a_ts, t1)))
            out[f"diffin_{tgt}:T2_only"] = au(sum(a * x for a, x in zip(a_ts, t2)))
            out[f"diffin_{tgt}:equal_checkpoint_weights"] = au(-sum(x + y for x, y in zip(t1, t2)))
            for i in range(m):
                out[f"diffin_{tgt}:checkpoint_{i}"] = au(a_ts[i] * (t1[i] + t2[i]))
    for i in range(m):
        if f"c{i}_tracin_target" in cols:
            out[f"tracin_target:checkpoint_{i}"] = au(cols[f"c{i}_tracin_target"])
        if f"c{i}_loss" in cols:
            out[f"baseline_loss:checkpoint_{i}"] = au(-cols[f"c{i}_loss"])
        if f"c{i}_clip_score" in cols:
            out[f"baseline_clip_score:checkpoint_{i}"] = au(cols[f"c{i}_clip_score"])
    if "diffin_self" in cols:  # the other orientation (-I(z,z), the column's sign before this was measured)
        out["diffin_self:sign_flipped"] = au(-cols["diffin_self"])
    std_au, within = {}, {}
    if caption_class is not None:
        # the class NAMED BY THE CAPTION is a function of the observable caption text (not the hidden image label);
        # influence scores carry large per-class offsets (the mean target gradient aligns differently with each
        # class), which a global ranking turns into class-level pruning
        names = {c: c for c in np.unique(caption_class)}
        for mth in [c for c in ALL_METHODS + DETECT_EXTRA if c in cols]:
            std_au[mth] = au(ql.group_standardized(cols[mth], caption_class))
            per = ql.auroc_by_group(cols[mth], swapped, caption_class, names)
            within[mth] = float(np.mean(list(per.values()))) if per else float("nan")
    corr = {}
    for mth in ("diffin_target", "diffin_train", "diffin_self", "tracin_target"):
        if mth in cols:
            corr[mth] = {b: ql.spearman(cols[mth], cols[b]) for b in ("baseline_loss", "baseline_clip_score")}
    return {"auroc": out, "auroc_caption_class_standardized": std_au, "auroc_within_caption_class_mean": within,
            "spearman_with_baselines": corr,
            "checkpoint_weights": [{"step": w[0], "eta": w[1], "a_t": w[2]} for w in weights]}


def ablations(a, seed, seed_dir, traj_path, pool_dir, target_dir, traj, uid_all, swapped_all) -> dict:
    """Rescore a hash-selected subsample with one setting changed; detection AUROC of the influence columns."""
    from pruner.config import load_config
    from sklearn.metrics import roc_auc_score
    res_p = seed_dir / "ablations.json"
    done = json.loads(res_p.read_text()) if res_p.exists() else {}
    hashes = {u: hashlib.sha1(f"ablation:{u}".encode()).hexdigest() for u in uid_all}
    subset = set(sorted(uid_all, key=hashes.get)[: a.ablation_samples])
    variants = {
        "baseline_settings": {},
        "in_batch_loss": {"features__loss": "in_batch"},
        "fd_eps_1e-3": {"scores__diffin": {"fd_eps": 1e-3}},
        "fd_eps_1e-1": {"scores__diffin": {"fd_eps": 1e-1}},
        "hvp_eps_1e-3": {"scores__diffin": {"hvp_eps": 1e-3}},
        "last_checkpoint": {"trajectory": "last"},
    }
    for name in ["baseline_settings"] + a.ablation_list:
        if name in done or name not in variants:
            continue
        t0 = time.time()
        over = dict(variants[name])
        base = job_config(a, seed, seed_dir, traj_path, pool_dir, target_dir)
        base["scores"]["methods"] = ["diffin", "tracin", "baselines"]
        if "scores__diffin" in over:
            base["scores"]["diffin"].update(over.pop("scores__diffin"))
        use_traj = traj
        if over.pop("trajectory", None) == "last":
            from pruner.model.checkpoints import Trajectory
            use_traj = Trajectory(checkpoints=traj.checkpoints[-1:], arch=traj.arch, pool_size=traj.pool_size,
                                  total_steps=traj.total_steps)
        for k, v in over.items():
            sec, _, key = k.partition("__")
            base[sec][key] = v
        cfg = load_config(data=base, check_paths=False)
        cols = score_subset(cfg, use_traj, a.device, subset)
        lab = dict(zip(uid_all, swapped_all))
        y = np.array([lab[u] for u in cols["uid"]])
        done[name] = {"n": int(len(y)), "seconds": time.time() - t0, "auroc": {
            m: float(roc_auc_score(y, -cols[m])) for m in ("diffin_target", "diffin_train", "diffin_self",
                                                           "tracin_target", "tracin_self", "baseline_loss",
                                                           "baseline_clip_score") if m in cols}}
        ql.write_json(res_p, done)
        log.info("ablation %s: %s", name, done[name]["auroc"])
    return done


# ---------------------------------------------------------------------------------------------------------------
def run_seed(a, seed: int, work: Path, train_split, test_split, classnames) -> dict:
    from pruner.config import load_config
    from pruner.model.checkpoints import load_trajectory
    t_seed = time.time()
    timings = {}
    seed_dir = work / f"seed-{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    n_cls = len(classnames["classnames"])
    prob = ql.build_problem(train_split, a.pool_size, a.target_size, a.noise, seed, n_cls, a.rare_classes,
                            a.rare_weight)
    keys = prob.keys
    pool_by_key = {s.key: s for s in prob.pool}
    swapped, labels = prob.swapped, prob.labels
    pool_dir, target_dir = seed_dir / "pool", seed_dir / "target"
    truth_p = seed_dir / "ground_truth.json"
    truth = {"keys": keys, "swapped": swapped.tolist(), "label": labels.tolist(),
             "caption_class": prob.caption_class.tolist(), "rare_classes": prob.rare_classes,
             "target_keys": [s.key for s in prob.target]}
    if not truth_p.exists() or json.loads(truth_p.read_text()) != truth:
        ql.write_shards(prob.pool, pool_dir, "pool")
        ql.write_shards(prob.target, target_dir, "target", min_shards=1)
        ql.write_json(truth_p, truth)

    # -- proxy ---------------------------------------------------------------------------------------------------
    t0 = time.time()
    proxy_dir = seed_dir / "proxy"
    ql.train_run(proxy_dir, prob.pool, arch=a.arch, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=seed,
                 device=a.device, checkpoints=a.checkpoints, log_every=50, optimizer=a.optimizer, momentum=a.momentum)
    timings["proxy_train_s"] = time.time() - t0
    traj_path = proxy_dir / "trajectory.json"
    traj = load_trajectory(file=str(traj_path))

    # -- scores --------------------------------------------------------------------------------------------------
    cfg = load_config(data=job_config(a, seed, seed_dir, traj_path, pool_dir, target_dir), check_paths=False)
    t0 = time.time()
    cols, shared, weights, smeta = cached_scores(a, cfg, traj, seed_dir)
    from pruner.scores.shared import CheckpointShared
    shared = [CheckpointShared.from_state(s.to_state(), a.device) for s in shared]
    timings["scoring_s"] = smeta["seconds"]
    pos = {u: i for i, u in enumerate(cols["uid"])}
    order = np.array([pos[k] for k in keys])  # columns -> pool order
    cols = {k: v[order] for k, v in cols.items()}
    uids = np.array(keys)
    niche_alpha = a.niche_alpha if cfg.niche_test_applies else None  # as the product's config resolves it
    cols["default_score"], niche = ql.pipeline_score(cols["diffin_target"], cols[TARGET_FREE_SCORE], uids,
                                                     a.filter_fraction, niche_alpha)
    methods = [m for m in ALL_METHODS + DETECT_EXTRA + ["default_score"] if m in cols]

    # -- (a) detection -------------------------------------------------------------------------------------------
    res: dict = {"seed": seed, "auroc": {}, "average_precision": {}, "found_at": {}, "auroc_per_class": {},
                 "auroc_by_frequency": {}}
    cls_names = {c: classnames["classnames"][c] for c in range(n_cls)}
    freq = np.array([1 if l in prob.rare_classes else 0 for l in labels])
    for m in methods:
        d = ql.detection(cols[m], swapped, uids)
        res["auroc"][m], res["average_precision"][m], res["found_at"][m] = d["auroc"], d["average_precision"], d["found_at"]
        res["auroc_per_class"][m] = ql.auroc_by_group(cols[m], swapped, labels, cls_names)
        if prob.rare_classes:
            res["auroc_by_frequency"][m] = ql.auroc_by_group(cols[m], swapped, freq, {0: "frequent", 1: "rare"})
    res["diagnostics"] = free_diagnostics(cols, weights, swapped, uids, prob.caption_class)
    res["default_score_niche_test"] = niche
    res["scoring"] = {k: smeta.get(k) for k in ("service", "seconds")}
    res["proxy"] = {"checkpoints": [{"step": c.step, "lr": c.lr, "lr_mean": c.lr_mean} for c in traj.checkpoints],
                    "train_loss": [c.get("train_loss") for c in json.loads(traj_path.read_text())["checkpoints"]]}
    res["timings"] = timings
    save_partial(a, seed_dir, res, timings)
    log.info("seed %d detection AUROC: %s", seed, {m: round(v, 3) for m, v in res["auroc"].items()})

    # -- evaluation inputs ---------------------------------------------------------------------------------------
    rng = np.random.default_rng(10_000 + seed)
    ev_idx = np.sort(rng.permutation(len(test_split))[: a.eval_size]) if 0 < a.eval_size < len(test_split) \
        else np.arange(len(test_split))
    test = [test_split[i] for i in ev_idx]
    ret_idx = np.sort(rng.permutation(len(test))[: min(a.retrieval_size, len(test))])
    ev = ql.EvalSet(a.arch, test, classnames, ret_idx)
    _, bank, reference, target = job_inputs(cfg)
    probe = ql.LossProbe(target_images=torch.stack([ev.preprocess(s.image) for s in target]),
                         target_tokens=ev.tokenizer([s.caption for s in target]),
                         bank_images=torch.stack([ev.preprocess(s.image) for s in bank]),
                         bank_tokens=ev.tokenizer([s.caption for s in bank]))
    runner = Runner(a, seed, seed_dir, ev, probe, pool_by_key)
    full = runner.result("full", keys, run_dir=proxy_dir)  # the proxy IS the full-data retraining (same seed/steps)
    clean_keys = [k for k, s in zip(keys, swapped) if not s]
    clean = runner.result("clean", clean_keys)
    res["full_data_zero_shot"], res["clean_data_zero_shot"] = full["zero_shot"], clean["zero_shot"]
    res["full_data_recall"] = {"text": full["recall_text"], "class": full["recall_class"]}
    res["clean_data_recall"] = {"text": clean["recall_text"], "class": clean["recall_class"]}
    res["full_data_target_loss"], res["clean_data_target_loss"] = full["target_loss"], clean["target_loss"]

    # -- (b) coresets --------------------------------------------------------------------------------------------
    t0 = time.time()
    res["coreset_zero_shot"], res["coreset_recall"], res["coreset_swapped_share"] = {}, {}, {}

    def coreset(m: str, f: float, idx: np.ndarray) -> None:
        """Retrain on the pool samples ``idx`` (cached) and record method m's results at keep fraction f."""
        r = runner.result(f"coreset-{m}-{f}", [keys[i] for i in idx])
        kf = f"keep_{f}"
        res["coreset_zero_shot"].setdefault(m, {})[kf] = r["zero_shot"]
        res["coreset_recall"].setdefault(m, {})[kf] = {"text": r["recall_text"], "class": r["recall_class"]}
        res["coreset_swapped_share"].setdefault(m, {})[kf] = float(swapped[idx].mean())

    for m in a.coreset_list:
        if m not in cols:
            continue
        for f in a.keep_list:
            coreset(m, f, keep_indices(cols[m], uids, f))
    if a.policy_list:
        res["policy_selection"] = {}
        pcs = policy_coresets(a, job_config(a, seed, seed_dir, traj_path, pool_dir, target_dir), keys)
        for (m, f), (idx, sm) in pcs.items():
            coreset(m, f, idx)
            res["policy_selection"].setdefault(m, {})[f"keep_{f}"] = {
                "groups": len(sm["groups"] or []), "dedup": sm["dedup"],
                "overlap_with_plain_top_k": float(np.isin(idx, keep_indices(cols[sm["score"]], uids, f)).mean())}
    res["coreset_zero_shot_balanced"], res["coreset_recall_balanced"] = {}, {}
    for m in a.balanced_list:
        if m not in cols:
            continue
        for f in a.balanced_keep_list:
            idx = ql.balanced_keep(cols[m], uids, prob.caption_class, f)
            r = runner.result(f"coreset-balanced-{m}-{f}", [keys[i] for i in idx])
            kf = f"keep_{f}"
            res["coreset_zero_shot_balanced"].setdefault(m, {})[kf] = r["zero_shot"]
            res["coreset_recall_balanced"].setdefault(m, {})[kf] = {"text": r["recall_text"], "class": r["recall_class"]}
            res["coreset_swapped_share"].setdefault(f"{m}:balanced", {})[kf] = float(swapped[idx].mean())
    timings["coresets_s"] = time.time() - t0

    save_partial(a, seed_dir, res, timings)

    # -- (d) data deletion ----------------------------------------------------------------------------------------
    t0 = time.time()
    selections = {}
    keep_half = keep_indices(cols["diffin_target"], uids, 0.5)
    skip_d = a.no_deletion
    drop = np.setdiff1d(np.arange(len(keys)), keep_half)
    selections["diffin_target_keep_0.5"] = (drop, "coreset-diffin_target-0.5")
    if a.deletion_drop:
        n_drop = int(round(a.deletion_drop * len(keys)))
        selections[f"diffin_target_lowest_{a.deletion_drop}"] = (ql.rank_order(cols["diffin_target"], uids)[::-1][:n_drop],
                                                                  f"deletion-diffin_target-lowest-{a.deletion_drop}")
    if a.groups:
        gsize = int(round(a.group_fraction * len(keys)))
        perm = np.random.default_rng(20_000 + seed).permutation(len(keys))
        selections["random_group_00"] = (perm[:gsize], "cf-group-00")
    deletion = {}
    a_ts = [w[2] for w in weights]
    # loss units (methods §1.2): a_t and b_t sum each checkpoint's increments over the Delta_t updates it stands for
    # (pruner.scorer.checkpoint_weights), so I(z,V) already estimates the loss change (the official code's a_t,
    # with 1/m for Delta_t and no T, is a_t / T for these evenly spaced checkpoints); TracIn's eta_i is the LR summed
    # over the interval, at 1/N of it per sample (expected SGD weight), so TracIn / N does
    T, n_pool = traj.total_steps or a.steps, traj.pool_size or len(keys)
    ref_batches = [(torch.stack([ev.preprocess(s.image) for s in r]), ev.tokenizer([s.caption for s in r]))
                   for r in reference]
    theta_T = ql.load_model(traj.checkpoints[-1].path, a.arch, a.device)
    base_T = ql.target_losses(theta_T, probe, a.device)
    for name, (didx, run_name) in ({} if skip_d else selections).items():
        didx = np.asarray(didx)
        dset = set(didx.tolist())
        kept = [k for i, k in enumerate(keys) if i not in dset]
        evaluate = run_name.startswith("coreset")
        r = runner.result(run_name, kept, evaluate=evaluate)
        p_upd = seed_dir / "deletion" / f"{name}.json"
        if p_upd.exists():
            upd = json.loads(p_upd.read_text())
        else:
            from pruner.grads.engine import PerSampleGradients
            dropped = [pool_by_key[keys[i]] for i in didx]
            batches = []
            for i in range(0, len(dropped), 128):
                ch = dropped[i:i + 128]
                batches.append((ev.images_of(ch), ev.tokenizer([s.caption for s in ch])))
            U, diag = ql.diffin_parameter_update(traj, a.arch, shared, a_ts, batches, ref_batches,
                                                 cfg.scores.diffin.hvp_eps, cfg.scores.diffin.fd_eps, a.device)
            model = ql.load_model(traj.checkpoints[-1].path, a.arch, a.device)
            params = PerSampleGradients(model, k=8, layer_k=2).params()
            upd = {"diagnostics": diag, "target_loss": {}, "target_loss_times_T": {}}
            ql.apply_update(model, params, U, 1.0 / T)  # theta_T + sum_z I_theta(z) with the official code's a_t
            upd["target_loss"] = ql.target_losses(model, probe, a.device)
            ql.apply_update(model, params, U, 1.0 - 1.0 / T)  # theta_T + sum_z I_theta(z), loss units (methods §1.2)
            upd["target_loss_times_T"] = ql.target_losses(model, probe, a.device)
            (seed_dir / "deletion").mkdir(exist_ok=True)
            ql.write_json(p_upd, upd)
        pred = {m: float(np.nansum(cols[m][didx])) for m in INFLUENCE + ["diffin_train"] if m in cols}
        pred_units = {"diffin_target": pred["diffin_target"],
                      "tracin_target": pred.get("tracin_target", float("nan")) / n_pool}
        deletion[name] = {
            "n_dropped": int(len(didx)), "swapped_share_of_dropped": float(swapped[didx].mean()),
            "predicted_change": pred, "predicted_change_loss_units": pred_units,
            "target_loss_original": base_T, "target_loss_param_update": upd["target_loss"],
            "target_loss_retrained": r["target_loss"],
            "actual_change": {d: r["target_loss"][d] - base_T[d] for d in ("bank", "in_batch")},
            "param_update_change": {d: upd["target_loss"][d] - base_T[d] for d in ("bank", "in_batch")},
            "target_loss_param_update_times_T": upd["target_loss_times_T"],
            "param_update_times_T_change": {d: upd["target_loss_times_T"][d] - base_T[d] for d in ("bank", "in_batch")},
            "update_diagnostics": upd["diagnostics"]}
    if smeta.get("predicted_target_loss_change_from_dropped") and "diffin_target_keep_0.5" in deletion:
        deletion["diffin_target_keep_0.5"]["job_summary_predicted_target_loss_change_from_dropped"] = \
            smeta["predicted_target_loss_change_from_dropped"]
    res["deletion"] = deletion
    timings["deletion_s"] = time.time() - t0

    save_partial(a, seed_dir, res, timings)

    # -- (c) counterfactual groups --------------------------------------------------------------------------------
    t0 = time.time()
    base_loss = full["target_loss"]
    cf = {"groups": [], "base_target_loss": base_loss}
    if a.groups:
        g_rng = np.random.default_rng(20_000 + seed)
        gsize = int(round(a.group_fraction * len(keys)))
        perm = g_rng.permutation(len(keys))
        disjoint = a.groups * gsize <= len(keys)
        for j in range(a.groups):
            gidx = perm[j * gsize:(j + 1) * gsize] if disjoint else g_rng.choice(len(keys), gsize, replace=False)
            gset = set(gidx.tolist())
            r = runner.result(f"cf-group-{j:02d}", [k for i, k in enumerate(keys) if i not in gset], evaluate=False)
            cf["groups"].append({
                "size": len(gidx), "swapped_in_group": int(swapped[gidx].sum()),
                "actual_change": {d: r["target_loss"][d] - base_loss[d] for d in ("bank", "in_batch")},
                "predicted": {m: float(np.nansum(cols[m][gidx])) for m in INFLUENCE + ["tracin_pred", "diffin_train"]
                              if m in cols}})
        for d in ("bank", "in_batch"):
            act = [g["actual_change"][d] for g in cf["groups"]]
            cf[f"spearman_{d}"] = {m: ql.spearman([g["predicted"][m] for g in cf["groups"]], act)
                                   for m in cf["groups"][0]["predicted"]}
            cf[f"pearson_{d}"] = {m: ql.pearson([g["predicted"][m] for g in cf["groups"]], act)
                                  for m in cf["groups"][0]["predicted"]}
        res["counterfactual_spearman"] = {m: cf["spearman_bank"][m] for m in INFLUENCE if m in cf["spearman_bank"]}
    else:
        res["counterfactual_spearman"] = {}
    noise = []
    for j in range(a.noise_runs):
        r = runner.result(f"noise-seed-{j}", keys, seed=seed + 1000 * (j + 1), evaluate=False)
        noise.append({d: r["target_loss"][d] - base_loss[d] for d in ("bank", "in_batch")})
    cf["retrain_seed_noise"] = noise
    if cf["groups"]:
        cf["actual_change_std"] = {d: float(np.std([g["actual_change"][d] for g in cf["groups"]]))
                                   for d in ("bank", "in_batch")}
    res["counterfactual"] = cf
    timings["counterfactual_s"] = time.time() - t0

    save_partial(a, seed_dir, res, timings)

    if a.ablation_list:
        t0 = time.time()
        res["ablations"] = ablations(a, seed, seed_dir, traj_path, pool_dir, target_dir, traj, keys, swapped)
        timings["ablations_s"] = time.time() - t0
    timings["train_runs_this_invocation"] = len(runner.train_seconds)
    timings["mean_train_run_s"] = float(np.mean(runner.train_seconds)) if runner.train_seconds else None
    timings["seed_wall_s"] = time.time() - t_seed
    res["timings"] = timings
    res["complete"] = True
    return res


# ---------------------------------------------------------------------------------------------------------------
AGG_KEYS = ["auroc", "average_precision", "found_at", "auroc_per_class", "auroc_by_frequency", "coreset_zero_shot",
            "coreset_recall", "coreset_zero_shot_balanced", "coreset_recall_balanced", "coreset_swapped_share", "full_data_zero_shot", "clean_data_zero_shot",
            "full_data_recall", "clean_data_recall", "counterfactual_spearman"]


def deletion_summary(per_seed) -> dict:
    out = {}
    for name in (per_seed[0]["deletion"] if per_seed else []):
        rows = [s["deletion"][name] for s in per_seed if name in s["deletion"]]
        keep = {k: [r[k] for r in rows] for k in ("n_dropped", "swapped_share_of_dropped", "predicted_change",
                                                  "predicted_change_loss_units", "target_loss_original",
                                                  "target_loss_param_update", "target_loss_param_update_times_T",
                                                  "target_loss_retrained", "actual_change", "param_update_change",
                                                  "param_update_times_T_change")}
        out[name] = {k: {"mean": ql.aggregate(v)[0], "std": ql.aggregate(v)[1]} for k, v in keep.items()}
    return out


def goals(r) -> dict:
    au, zs = r["auroc"], r["coreset_zero_shot"]
    g = {}
    if "diffin_target" in au:
        best_base = max(au[b] for b in BASELINES if b in au)
        g["diffin_auroc_ge_0.97"] = au["diffin_target"] >= 0.97
        g["diffin_auroc_ge_every_baseline"] = au["diffin_target"] >= best_base
    if "diffin_target" in zs and "keep_0.5" in zs["diffin_target"]:
        d = zs["diffin_target"]["keep_0.5"]
        g["diffin_keep_0.5_ge_full_noisy"] = d >= r["full_data_zero_shot"]
        if "baseline_random" in zs:
            g["diffin_keep_0.5_ge_random_plus_3pts"] = d >= zs["baseline_random"]["keep_0.5"] + 0.03
        simple = [zs[b]["keep_0.5"] for b in ("baseline_clip_score", "baseline_loss") if b in zs]
        if simple:
            g["diffin_keep_0.5_ge_best_simple_filter"] = d >= max(simple)
    return g


def fmt(x, std=None, pct=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    s = f"{100 * x:.1f}" if pct else f"{x:.3f}"
    if std:
        s += f" ± {100 * std:.1f}" if pct else f" ± {std:.3f}"
    return s


def markdown(r) -> str:
    sd = r["std"]
    L = [f"### Quality benchmark ({r['config']['arch']}, pool {r['config']['pool_size']}, "
         f"{int(100 * r['config']['noise'])}% swapped captions, {r['config']['steps']} steps, seeds {r['seeds']})", "",
         f"Command: `{r['command']}`  ",
         f"Wall time: {r['wall_time_s'] / 60:.1f} min on {r['machine']}; scoring via {r['scoring_service']}.", "",
         "| method | AUROC | AP | found@10% | found@20% | found@30% | ZS keep 50% | ZS keep 30% | swapped in 50% |",
         "|---|---|---|---|---|---|---|---|---|"]
    zs, zss = r["coreset_zero_shot"], sd.get("coreset_zero_shot", {})
    for m in r["auroc"]:
        fa = r["found_at"][m]
        row = [m, fmt(r["auroc"][m], sd["auroc"].get(m)), fmt(r["average_precision"][m], sd["average_precision"].get(m)),
               fmt(fa["0.1"], pct=True), fmt(fa["0.2"], pct=True), fmt(fa["0.3"], pct=True)]
        for kf in ("keep_0.5", "keep_0.3"):
            row.append(fmt(zs.get(m, {}).get(kf), zss.get(m, {}).get(kf), pct=True) if m in zs else "—")
        sh = r["coreset_swapped_share"].get(m, {}).get("keep_0.5")
        row.append(fmt(sh, pct=True) if sh is not None else "—")
        L.append("| " + " | ".join(row) + " |")
    diag = r.get("diagnostics", {})
    if diag.get("auroc_caption_class_standardized"):
        L += ["", "Investigation: detection AUROC after z-normalising each score within the class its caption names "
              "(per-class offsets removed), the mean AUROC within caption classes, and class-balanced 50% coresets "
              "(top 50% within each caption class):", "",
              "| method | AUROC standardized | mean AUROC within class | ZS balanced keep 50% |", "|---|---|---|---|"]
        zb = r.get("coreset_zero_shot_balanced", {})
        for m, v in diag["auroc_caption_class_standardized"].items():
            b = zb.get(m, {}).get("keep_0.5")
            L.append(f"| {m} | {fmt(v)} | {fmt(diag['auroc_within_caption_class_mean'].get(m))} | "
                     f"{fmt(b, sd.get('coreset_zero_shot_balanced', {}).get(m, {}).get('keep_0.5'), pct=True) if b is not None else '—'} |")
    L += ["", "| reference | zero-shot top-1 (%) | i2t R@1 / R@5 (text) | t2i R@1 / R@5 (text) | i2t R@1 (class) |",
          "|---|---|---|---|---|"]
    for name, zk, rk in (("full noisy data", "full_data_zero_shot", "full_data_recall"),
                         ("clean data only", "clean_data_zero_shot", "clean_data_recall")):
        t, c = r[rk]["text"], r[rk]["class"]
        L.append(f"| {name} | {fmt(r[zk], sd.get(zk), pct=True)} | {fmt(t['i2t_r1'], pct=True)} / "
                 f"{fmt(t['i2t_r5'], pct=True)} | {fmt(t['t2i_r1'], pct=True)} / {fmt(t['t2i_r5'], pct=True)} | "
                 f"{fmt(c['i2t_r1'], pct=True)} |")
    for m in zs:
        rr = r["coreset_recall"][m]["keep_0.5"]
        t, c = rr["text"], rr["class"]
        L.append(f"| {m} keep 50% | {fmt(zs[m]['keep_0.5'], pct=True)} | {fmt(t['i2t_r1'], pct=True)} / "
                 f"{fmt(t['i2t_r5'], pct=True)} | {fmt(t['t2i_r1'], pct=True)} / {fmt(t['t2i_r5'], pct=True)} | "
                 f"{fmt(c['i2t_r1'], pct=True)} |")
    L += ["", "Counterfactual fidelity (Spearman of group-summed predictions with the retrained target-loss change, "
          f"{r['config']['groups']} random groups of {100 * r['config']['group_fraction']:.0f}%):", ""]
    for m, v in r["counterfactual_spearman"].items():
        L.append(f"- {m}: {fmt(v, sd.get('counterfactual_spearman', {}).get(m))} (bank loss); in-batch loss: "
                 f"{fmt(r['counterfactual_spearman_in_batch'].get(m))}")
    L.append(f"- group effect std {fmt(r['counterfactual_group_effect_std'])} vs retrain-seed noise "
             f"|dL| {fmt(r['counterfactual_seed_noise'])} (bank target loss)")
    L += ["", "Data deletion (bank target loss; Diff-In sum as the job reports it, in loss units since its weights count "
          "each checkpoint's updates; TracIn / N; U/T: the official code's a_t):", "",
          "| selection | n dropped | swapped share | pred. dL Diff-In (job / loss units) | pred. dL TracIn | actual dL "
          "(retrain) | L(theta_T) | L(theta_T + U/T) | L(theta_T + U) | L(retrained) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in r["deletion"].items():
        pu = d["predicted_change_loss_units"]["mean"]
        L.append(f"| {name} | {d['n_dropped']['mean']:.0f} | {fmt(d['swapped_share_of_dropped']['mean'], pct=True)} | "
                 f"{d['predicted_change']['mean'].get('diffin_target', float('nan')):.2e} / {fmt(pu.get('diffin_target'))} | "
                 f"{fmt(pu.get('tracin_target'))} | {fmt(d['actual_change']['mean']['bank'], d['actual_change']['std']['bank'])} | "
                 f"{fmt(d['target_loss_original']['mean']['bank'])} | {fmt(d['target_loss_param_update']['mean']['bank'])} | "
                 f"{fmt(d['target_loss_param_update_times_T']['mean']['bank'])} | "
                 f"{fmt(d['target_loss_retrained']['mean']['bank'])} |")
    L += ["", "Goals: " + ", ".join(f"{k}: {'MET' if v else 'NOT met'}" for k, v in r["goals"].items())]
    if r["config"].get("policies"):
        L += ["", policy_markdown(r)]
    return "\n".join(L)


def policy_markdown(r) -> str:
    """Selection policies vs the plain top-k of the same score: zero-shot top-1, class-level recall@1 (image to
    text / text to image) and the share of swapped pairs kept, per keep fraction."""
    c = r["config"]
    kfs = [f"keep_{f}" for f in c["keep_fractions"]]
    L = [f"Policies ({c['policy_clusters']} gradient clusters; classes = the image label; top_k_dedup: cosine > "
         f"{c['dedup_threshold']} in {c['dedup_space']} space):", "",
         "| method | " + " | ".join(f"ZS {k[5:]} | R@1 i2t/t2i (class) {k[5:]} | swapped {k[5:]}" for k in kfs) + " |",
         "|---|" + "---|---|---|" * len(kfs)]
    for score in c["policy_scores"]:
        for m in [score] + [f"{score}:{p}" for p in c["policies"]]:
            if m not in r["coreset_zero_shot"]:
                continue
            row = [m]
            for k in kfs:
                rc = r["coreset_recall"][m][k]["class"]
                row += [fmt(r["coreset_zero_shot"][m][k], pct=True),
                        f"{fmt(rc['i2t_r1'], pct=True)} / {fmt(rc['t2i_r1'], pct=True)}",
                        fmt(r["coreset_swapped_share"][m][k], pct=True)]
            L.append("| " + " | ".join(row) + " |")
    return "\n".join(L)


def summarize(per_seed: list, config: dict, command: str, machine: str, wall: float, work: str) -> dict:
    """The result document: means over seeds in the top-level keys, sample std devs under "std", per-seed
    results under "per_seed"."""
    r: dict = {}
    std: dict = {}
    for k in AGG_KEYS:
        vals = [s[k] for s in per_seed if k in s]
        if vals:
            r[k], std[k] = ql.aggregate(vals)
    with_cf = [s for s in per_seed if "counterfactual" in s]
    r.setdefault("counterfactual_spearman", {})
    cf_in_batch = [s["counterfactual"].get("spearman_in_batch", {}) for s in with_cf]
    r["counterfactual_spearman_in_batch"] = ql.aggregate(cf_in_batch)[0] if cf_in_batch and cf_in_batch[0] else {}
    r["counterfactual_group_effect_std"] = ql.aggregate(
        [s["counterfactual"].get("actual_change_std", {}).get("bank", float("nan")) for s in with_cf] or [float("nan")])[0]
    r["counterfactual_seed_noise"] = ql.aggregate(
        [float(np.mean([abs(n["bank"]) for n in s["counterfactual"]["retrain_seed_noise"]]))
         if s["counterfactual"]["retrain_seed_noise"] else float("nan") for s in with_cf] or [float("nan")])[0]
    r["counterfactual_seeds"] = [s["seed"] for s in with_cf]
    r["std"] = std
    r["deletion"] = deletion_summary([s for s in per_seed if "deletion" in s])
    r["complete_seeds"] = [s["seed"] for s in per_seed if s.get("complete")]
    r["diagnostics"] = {"auroc": ql.aggregate([s["diagnostics"]["auroc"] for s in per_seed])[0],
                        "auroc_caption_class_standardized": ql.aggregate(
                            [s["diagnostics"].get("auroc_caption_class_standardized", {}) for s in per_seed])[0],
                        "auroc_within_caption_class_mean": ql.aggregate(
                            [s["diagnostics"].get("auroc_within_caption_class_mean", {}) for s in per_seed])[0],
                        "spearman_with_baselines": ql.aggregate([s["diagnostics"]["spearman_with_baselines"]
                                                                 for s in per_seed])[0]}
    if any("ablations" in s for s in per_seed):
        r["ablations"] = {str(s["seed"]): s.get("ablations") for s in per_seed}
    r["seeds"] = [s["seed"] for s in per_seed]
    r["config"] = config
    r["scoring_service"] = per_seed[0]["scoring"]["service"]
    r["goals"] = goals(r)
    r["per_seed"] = per_seed
    r["wall_time_s"] = wall
    r["command"] = command
    r["machine"] = machine
    r["work_dir"] = work
    return r


def merge(paths: list[str], out: str) -> int:
    """Combine result files of separate runs (e.g. one seed each, run in parallel) into one document."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    per_seed = sorted([s for d in docs for s in d["per_seed"]], key=lambda s: s["seed"])
    seeds = [s["seed"] for s in per_seed]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"duplicate seeds in {paths}: {seeds}")
    full_docs = [d for d in docs if d.get("config")]
    if not full_docs:
        raise SystemExit("merge needs at least one complete result file (partial files carry no config)")
    cfg = dict(full_docs[0]["config"])
    for d in full_docs[1:]:
        diff = {k for k in cfg if k not in ("threads",) and d["config"].get(k) != cfg[k]}
        if diff:
            raise SystemExit(f"{paths}: settings differ ({sorted(diff)}); only runs of one configuration merge")
    command = (" ; ".join(d["command"] for d in full_docs) + " ; then: .venv/bin/python benchmarks/quality.py --merge "
               + " ".join(Path(p).name for p in paths) + f" --out {out}")
    r = summarize(per_seed, cfg, command, full_docs[0]["machine"], max(d["wall_time_s"] for d in full_docs),
                  ", ".join(d.get("work_dir", "") for d in full_docs))
    r["wall_time_s_per_run"] = [d["wall_time_s"] for d in full_docs]
    ql.write_json(Path(out), r)
    print(markdown(r), flush=True)
    print(f"\nwrote {out}", flush=True)
    return 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--merge":
        rest = argv[1:]
        out = rest[rest.index("--out") + 1] if "--out" in rest else str(DEFAULT_OUT)
        files = [x for j, x in enumerate(rest) if x != "--out" and (j == 0 or rest[j - 1] != "--out")]
        return merge(files, out)
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("quality", "pruner"):
        logging.getLogger(name).setLevel(logging.INFO)
    torch.set_num_threads(a.threads)
    t_all = time.time()
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.gettempdir()) / "pruner-quality" / settings_hash(a)
    work.mkdir(parents=True, exist_ok=True)
    log.info("work dir %s", work)
    data_dir = Path(a.data_dir)
    classnames = ql.load_classnames(data_dir)
    train_split = ql.read_split(data_dir, "train", a.train_shards)
    test_split = ql.read_split(data_dir, "test", a.test_shards)
    per_seed = []
    for seed in a.seed_list:
        per_seed.append(run_seed(a, seed, work, train_split, test_split, classnames))
        ql.write_json(work / f"seed-{seed}" / "result.json", per_seed[-1])
    config = {k: getattr(a, k) for k in RESULT_SETTINGS} | {
        "keep_fractions": a.keep_list, "coreset_methods": a.coreset_list, "no_ray": a.no_ray, "threads": a.threads,
        "diffin_form": a.diffin_form,
        "balanced_methods": a.balanced_list, "balanced_keep": a.balanced_keep_list,
        "policies": a.policy_list, "policy_scores": a.policy_score_list, "policy_clusters": a.policy_clusters,
        "dedup_threshold": a.dedup_threshold, "dedup_space": a.dedup_space,
        "target_set": f"held-out clean slice of the TRAIN split ({a.target_size} pairs, class-balanced, disjoint "
                      f"from the pool); evaluation on the TEST split only",
        "target_loss": "mean over V of pruner.model.loss.bank_loss vs the prune job's fixed bank pairs, embedded by "
                       "the evaluated model (in-batch mean loss over fixed target batches of 64 also reported)",
        "retrieval_hit": "retrieved caption TEXT equals the paired caption text (synthetic captions); class-level "
                         "hits reported as recall_class"}
    command = " ".join([".venv/bin/python", "benchmarks/quality.py"] + [shlex.quote(x) for x in argv])
    machine = (f"{platform.machine()} {os.cpu_count()} CPU cores" +
               (f", {torch.cuda.get_device_name(0)}" if a.device == "cuda" else ""))
    r = summarize(per_seed, config, command, machine, time.time() - t_all, str(work))
    ql.write_json(Path(a.out), r)
    print(markdown(r), flush=True)
    print(f"\nwrote {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
