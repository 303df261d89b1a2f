"""Does a score predict what removing data does? The linear datamodeling score (LDS) of Diff-In's forms, TracIn and a
TRAK-style score (TRAK, Park et al. 2023; dattri's LDS benchmark).

    .venv/bin/python benchmarks/counterfactual.py                       # the recorded CPU run (2 pools x 50 subsets)
    .venv/bin/python benchmarks/counterfactual.py --subsets 4 --pool-size 300 --steps 10 --out /tmp/cf.json   # smoke

Per pool variant (``--variants``: ``clean``, and ``swapped`` with ``--noise`` of the captions swapped across classes,
quality_lib.build_problem): a pool of ``--pool-size`` CIFAR-10 training pairs, a clean target set of
``--target-size`` held-out training pairs (all classes), a proxy trajectory trained on the whole pool (pruner's
trainer, ``--steps`` steps, ``--checkpoints`` checkpoints), one product scoring job per Diff-In form (pruner prune
through Ray, features saved). ``--subsets`` random subsets of half the pool (seeded) are each retrained from scratch
with the proxy's schedule and seed; the actual effect on target pair j is L_j(retrained) - L_j(proxy), with L the
bank loss of pruner's scores (the job's bank pairs, embedded by the evaluated model) and, for the mean, the in-batch
loss too. The noise floor: ``--noise-runs`` retrainings of the whole pool with other seeds.

Predictions, removal convention (positive = removing raises the loss): for a subset S, the sum over the removed half
of each method's per-sample influence. Per target pair (from the job's stored projected gradients and shared
quantities; exact where the job has the exact value):
  * ``diffin_propagated``: Diff-In's propagated form with target pair j's own gradient (pruner.scores.propagation);
  * ``diffin_exact_increment``: sum_t b_t <P g_j, P g_z> + a_t <K_t P g_j, P g_z> (the second-order term with the
    sketched Gauss-Newton matrix standing for H_B);
  * ``tracin``: sum_t eta_t <P g_j, P g_z>;
  * ``trak``: sum_t <P g_z, (K_t + lambda I)^-1 P g_j> / m (a checkpoint ensemble of the projected Gauss-Newton
    inverse; lambda = ``--trak-damping`` x the mean eigenvalue of K_t);
  * ``random``.
For the mean target loss also the jobs' own columns (``job:diffin_target[<form>]`` with exact dots where the form
has them, ``job:tracin_target``). LDS = Spearman(predicted, actual) over the subsets, per target pair then averaged
(TRAK's definition), and for the mean target loss; 95% bootstrap intervals over subsets (``--bootstrap``).
Ablations from the same retrainings: the number of checkpoints (the last 1..m) and the sketch dimension k (the first
k' coordinates of the k-dim sketch, an independent JL sketch of its own, rescaled).

Result: ``--out`` (``lds``, ``lds_ci``, ``lds_mean_target``, ``noise_floor``, ``subsets``, ``ablations``,
``config``) and a table on stdout. Runs are cached in ``--work-dir`` by the hash of their key sets.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
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

log = logging.getLogger("counterfactual")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "counterfactual.json"
METHODS = ["diffin_propagated", "diffin_exact_increment", "tracin", "trak", "random"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--work-dir")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--variants", default="clean,swapped")
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--pool-size", type=int, default=2000)
    p.add_argument("--target-size", type=int, default=64)
    p.add_argument("--subsets", type=int, default=50)
    p.add_argument("--retrain-seeds", type=int, default=1, help="retrainings per subset (their effects averaged)")
    p.add_argument("--noise-runs", type=int, default=3)
    p.add_argument("--arch", default="pruner-micro")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpoints", type=int, default=4)
    p.add_argument("--forms", default="propagated,exact_increment,taylor", help="one job per Diff-In form")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--k-ablation", default="64,256", help="sketch dimensions below k for the ablation")
    p.add_argument("--bank-size", type=int, default=512)
    p.add_argument("--trak-damping", type=float, default=1e-2)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--deletion-checks", type=int, default=3, help="subsets whose removed half also gets Diff-In's "
                   "parameter update (pruner.deletion), its target loss compared with the retraining's")
    p.add_argument("--lanczos-steps", type=int, default=12)
    p.add_argument("--curvature-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    a.variant_list = [v for v in a.variants.split(",") if v]
    a.form_list = [f for f in a.forms.split(",") if f]
    a.k_list = [int(k) for k in a.k_ablation.split(",") if k]
    return a


SETTINGS = ("data_dir", "noise", "pool_size", "target_size", "arch", "steps", "batch_size", "lr", "checkpoints", "k",
            "bank_size", "curvature_samples", "seed")


def settings_hash(a) -> str:
    return ql.settings_hash({k: getattr(a, k) for k in SETTINGS})


def job_config(a, out_dir: Path, traj: Path, pool_dir: Path, target_dir: Path, form: str) -> dict:
    return {"name": f"cf-{form}", "output_dir": str(out_dir), "seed": a.seed,
            "data": {"shards": [str(pool_dir)]}, "target": {"shards": [str(target_dir)], "max_samples": a.target_size},
            "model": {"arch": a.arch, "device": "cpu"}, "trajectory": {"file": str(traj)},
            "features": {"k": a.k, "bank_size": a.bank_size, "batch_size": 64, "save": True},
            "scores": {"methods": ["diffin", "tracin", "baselines"],
                       "diffin": {"form": form, "targets": ["target"],
                                  "curvature_samples": min(a.curvature_samples, a.pool_size)}},
            "select": {"keep_fraction": 0.5}, "ray": {"num_actors": 1, "cpus_per_actor": 1}}


# ---------------------------------------------------------------------------------------------------------------
def job_arrays(cfg, layout, keys: list[str]):
    """(features per checkpoint [n, k] float64 in pool order, the job's ranking columns in pool order, shared states,
    checkpoint weights from trajectory.json)."""
    import pyarrow.parquet as pq

    from pruner.io.shards import expand_shard_specs
    from pruner.io.store import load_features
    from pruner.scores.shared import CheckpointShared
    pool = expand_shard_specs(cfg.data.shards)
    tj = json.loads(layout.trajectory.read_text())["checkpoints"]
    m = len(tj)
    feats, uids = [[] for _ in range(m)], []
    for url in pool:
        uids += pq.read_table(layout.scores(url), columns=["uid"])["uid"].to_pylist()
        for i in range(m):
            feats[i].append(np.asarray(load_features(layout.features(url, i)), np.float64))
    pos = {u: j for j, u in enumerate(uids)}
    order = np.array([pos[k] for k in keys])
    feats = [torch.from_numpy(np.concatenate(f)[order]) for f in feats]
    t = pq.read_table(layout.ranking).to_pydict()
    rpos = {u: j for j, u in enumerate(t["uid"])}
    rorder = np.array([rpos[k] for k in keys])
    cols = {c: np.asarray(v, np.float64)[rorder] for c, v in t.items() if c in ("diffin_target", "tracin_target")}
    shared = [CheckpointShared.load(layout.shared(i)) for i in range(m)]
    return feats, cols, shared, tj


def target_features(cfg, traj, shared, target) -> list[torch.Tensor]:
    """P g_j(theta_t) [J, k] per checkpoint: each target pair's projected bank-loss gradient (the pairs the job's
    v_target averages)."""
    from pruner.scorer import Scorer
    scorer = Scorer(cfg, traj, device="cpu")
    scorer.set_shared(shared)
    out = []
    for sc in scorer.scorers:
        parts = [torch.from_numpy(sc.compute(i, t, u)[1]) for i, t, u in scorer.uid_batches(target)]
        out.append(torch.cat(parts).double())
    return out


def per_target_scores(feats, tfeats, shared, tj, k_use: int | None = None, last: int | None = None,
                      trak_damping: float = 1e-2, n_pool: int = 1) -> dict[str, np.ndarray]:
    """{method: influence [n, J]} of every pool sample on every target pair (module docstring), over the last
    ``last`` checkpoints and the first ``k_use`` sketch coordinates (rescaled by k / k_use)."""
    from pruner.scores.propagation import curvature, propagated_directions
    m = len(feats)
    idx = list(range(m - (last or m), m))
    k = feats[0].shape[1]
    ku = k_use or k
    scale = (k / ku) ** 0.5
    F = [feats[i][:, :ku] * scale for i in idx]
    T = [tfeats[i][:, :ku] * scale for i in idx]
    rng = np.random.default_rng(50_000)
    sub = np.sort(rng.choice(F[0].shape[0], min(2048, F[0].shape[0]), replace=False))
    K = [curvature(f[sub]) for f in F]
    eta = [float(tj[i]["eta"]) for i in idx]
    b = [float(tj[i]["b_t"]) for i in idx]
    a_t = [float(tj[i]["a_t"]) for i in idx]
    s = [shared[i].step_scale for i in idx]
    out = {}
    w = propagated_directions(T[-1].T.contiguous(), K, [e * x for e, x in zip(eta, s)], [bb * x for bb, x in zip(b, s)])
    out["diffin_propagated"] = sum(f @ wc for f, wc in zip(F, w)).numpy()
    out["diffin_exact_increment"] = sum(bb * (f @ t.T) + aa * (f @ k_.apply(lambda e: 1 + e, t.T) - f @ t.T)
                                        for f, t, k_, bb, aa in zip(F, T, K, b, a_t)).numpy()
    out["tracin"] = sum(e * (f @ t.T) for f, t, e in zip(F, T, eta)).numpy() / n_pool
    trak = 0
    for f, t, k_ in zip(F, T, K):
        lam = trak_damping * float(k_.eigvals.sum()) / ku
        inv = k_.apply(lambda e: (lam / (e + lam)), t.T) / lam  # (K + lam I)^-1 t, as lam^-1 g(K) with g(0) = 1
        trak = trak + f @ inv
    out["trak"] = (trak / len(F)).numpy()
    out["random"] = np.random.default_rng(7).standard_normal(out["tracin"].shape)
    return out


def column_spearman(p: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Spearman's rho of each column pair of p, a [subsets, J] (ties ranked by their average, as
    scipy.stats.spearmanr), 0 where a column is constant: Pearson on the ranks, all columns at once (the bootstrap
    calls this 2,000 times per method, where a loop of scipy calls took minutes)."""
    from scipy.stats import rankdata
    rp, ra = rankdata(p, axis=0), rankdata(a, axis=0)
    rp, ra = rp - rp.mean(0), ra - ra.mean(0)
    den = np.sqrt((rp ** 2).sum(0) * (ra ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rp * ra).sum(0) / den
    return np.where(den > 0, rho, 0.0)


def lds(pred: np.ndarray, actual: np.ndarray, n_boot: int, rng) -> tuple[float, list[float], np.ndarray]:
    """(mean over target pairs of Spearman over subsets, its 95% bootstrap interval over subsets, per-pair values).
    pred, actual: [subsets, J]."""
    def mean_rho(p, a):
        return column_spearman(p, a)
    per = mean_rho(pred, actual)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(pred), len(pred))
        boots.append(float(mean_rho(pred[i], actual[i]).mean()))
    ci = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))] if boots else [float("nan")] * 2
    return float(per.mean()), ci, per


# ---------------------------------------------------------------------------------------------------------------
def run_variant(a, variant: str, work: Path, train, classnames) -> dict:
    from pruner.config import load_config
    from pruner.model.checkpoints import load_trajectory
    from quality import job_inputs, run_prune_job
    vd = work / variant
    noise = a.noise if variant == "swapped" else 0.0
    prob = ql.build_problem(train, a.pool_size, a.target_size, noise, a.seed, len(classnames["classnames"]))
    keys = prob.keys
    pool_by_key = {s.key: s for s in prob.pool}
    if not (vd / "pool.json").exists():
        ql.write_shards(prob.pool, vd / "pool", "pool")
        ql.write_shards(prob.target, vd / "target", "target", min_shards=1)
        ql.write_json(vd / "pool.json", {"keys": keys, "swapped": prob.swapped.tolist()})
    proxy = ql.train_run(vd / "proxy", prob.pool, arch=a.arch, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                         seed=a.seed, device="cpu", checkpoints=a.checkpoints, log_every=100)
    traj_path = proxy / "trajectory.json"
    traj = load_trajectory(file=str(traj_path))
    jobs = {}
    t0 = time.time()
    for form in a.form_list:
        cfg = load_config(data=job_config(a, vd / "jobs", traj_path, vd / "pool", vd / "target", form),
                          check_paths=False)
        layout, _, _ = run_prune_job(cfg)
        jobs[form] = (cfg, layout)
    scoring_s = time.time() - t0
    cfg, layout = jobs["propagated"]
    feats, cols, shared, tj = job_arrays(cfg, layout, keys)
    _, bank, _, target = job_inputs(cfg)
    from pruner.model.clip import create_clip
    _, pre, tok = create_clip(a.arch)
    probe = ql.LossProbe(target_images=torch.stack([pre(s.image) for s in target]),
                         target_tokens=tok([s.caption for s in target]),
                         bank_images=torch.stack([pre(s.image) for s in bank]), bank_tokens=tok([s.caption for s in bank]))
    tfeats = target_features(cfg, traj, shared, target)
    n_pool = int(round(tj[0]["eta"] / tj[0]["b_t"]))
    full = ql.target_losses(ql.load_model(traj.checkpoints[-1].path, a.arch, "cpu"), probe, "cpu", per_sample=True)

    def effect(run_keys, seed) -> dict:
        rd = vd / "runs" / f"{ql.keyset_hash(run_keys)}-s{seed}"
        res_p = rd / "losses.json"
        if not res_p.exists():
            ql.train_run(rd, [pool_by_key[k] for k in run_keys], arch=a.arch, steps=a.steps, batch_size=a.batch_size,
                         lr=a.lr, seed=seed, device="cpu", log_every=1000)
            ql.write_json(res_p, ql.target_losses(ql.load_model(ql.last_checkpoint(rd), a.arch, "cpu"), probe, "cpu",
                                                  per_sample=True))
            for p in (rd / "train" / "checkpoints").glob("*.pt"):
                p.unlink()
        return json.loads(res_p.read_text())

    rng = np.random.default_rng(10_000 + a.seed)
    subsets = [np.sort(rng.choice(len(keys), len(keys) // 2, replace=False)) for _ in range(a.subsets)]
    actual, actual_mean, actual_inb = [], [], []
    t0 = time.time()
    for j, keep in enumerate(subsets):
        runs = [effect(sorted(keys[i] for i in keep), a.seed + 7919 * r) for r in range(a.retrain_seeds)]
        actual.append(np.mean([np.array(r["bank_per_sample"]) - np.array(full["bank_per_sample"]) for r in runs], 0))
        actual_mean.append(np.mean([r["bank"] - full["bank"] for r in runs]))
        actual_inb.append(np.mean([r["in_batch"] - full["in_batch"] for r in runs]))
        log.info("%s subset %d/%d: mean target loss change %+.4f (%.0f s)", variant, j + 1, len(subsets),
                 actual_mean[-1], time.time() - t0)
    retrain_s = time.time() - t0
    noise = [effect(keys, a.seed + 1000 * (r + 1)) for r in range(a.noise_runs)]
    noise_mean = [r["bank"] - full["bank"] for r in noise]
    actual, actual_mean, actual_inb = np.array(actual), np.array(actual_mean), np.array(actual_inb)
    removed = np.ones((len(subsets), len(keys)), bool)
    for j, keep in enumerate(subsets):
        removed[j, keep] = False
    brng = np.random.default_rng(3)

    def evaluate(scores: dict[str, np.ndarray]) -> dict:
        out = {}
        for m, sc in scores.items():
            pred = removed.astype(np.float64) @ sc  # [subsets, J]
            mean_lds, ci, per = lds(pred, actual, a.bootstrap, brng)
            pm = pred.mean(1)
            mt, mt_ci, _ = lds(pm[:, None], actual_mean[:, None], a.bootstrap, brng)
            out[m] = {"lds": mean_lds, "lds_ci": ci, "lds_mean_target": mt, "lds_mean_target_ci": mt_ci,
                      "lds_mean_target_in_batch": lds(pm[:, None], actual_inb[:, None], 0, brng)[0]}
        return out

    res = {"variant": variant, "subsets": len(subsets), "retrain_seconds": retrain_s, "scoring_seconds": scoring_s,
           "methods": evaluate(per_target_scores(feats, tfeats, shared, tj, trak_damping=a.trak_damping,
                                                 n_pool=n_pool))}
    # the jobs' own mean-target columns, exact dots where the form has them
    from scipy.stats import spearmanr
    job_cols = {}
    for form, (cfg_f, layout_f) in jobs.items():
        _, cols_f, _, _ = job_arrays(cfg_f, layout_f, keys)
        job_cols[f"job:diffin_target[{form}]"] = cols_f["diffin_target"]
    job_cols["job:tracin_target"] = cols["tracin_target"]
    res["job_columns_lds_mean_target"] = {
        c: float(spearmanr(removed.astype(np.float64) @ v, actual_mean).statistic) for c, v in job_cols.items()}
    res["ablations"] = {"checkpoints": {}, "k": {}}
    for last in range(1, len(feats)):
        res["ablations"]["checkpoints"][f"last_{last}"] = {
            m: v["lds"] for m, v in evaluate(per_target_scores(feats, tfeats, shared, tj, last=last,
                                                               trak_damping=a.trak_damping, n_pool=n_pool)).items()}
    for ku in a.k_list:
        res["ablations"]["k"][str(ku)] = {
            m: v["lds"] for m, v in evaluate(per_target_scores(feats, tfeats, shared, tj, k_use=ku,
                                                               trak_damping=a.trak_damping, n_pool=n_pool)).items()}
    res["noise_floor"] = {"full_pool_retrain_seed_std": float(np.std(noise_mean, ddof=1)) if len(noise_mean) > 1
                          else float("nan"), "full_pool_retrain_effects": noise_mean,
                          "subset_effect_std": float(np.std(actual_mean, ddof=1)),
                          "signal_to_noise": float(np.std(actual_mean, ddof=1) / max(np.std(noise_mean, ddof=1), 1e-12))
                          if len(noise_mean) > 1 else float("nan")}
    res["mean_target_effects"] = actual_mean.tolist()
    res["deletion"] = deletion_checks(a, vd, layout, keys, subsets, actual_mean, cols, probe, full)
    return res


def deletion_checks(a, vd: Path, layout, keys, subsets, actual_mean, cols, probe, full) -> list[dict]:
    """For the first ``--deletion-checks`` subsets: Diff-In's parameter update for their removed half (the product's
    pruner.deletion, propagated form), the updated model's target loss change against the prediction (the sum of
    the stored diffin_target) and against retraining without the half."""
    from pruner.deletion import parameter_update
    out = []
    for j, keep in enumerate(subsets[: a.deletion_checks]):
        p = vd / "deletion" / f"subset-{j:02d}.json"
        if not p.exists():
            removed = set(keys) - {keys[i] for i in keep}
            t0 = time.time()
            delta, model, diag = parameter_update(layout.root, removed, lanczos_steps=a.lanczos_steps)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, d in delta.items():
                    params[n].add_(d)
            upd = ql.target_losses(model, probe, "cpu")
            mask = np.ones(len(keys), bool)
            mask[keep] = False
            ql.write_json(p, {"subset": j, "n_removed": len(removed), "seconds": time.time() - t0,
                              "predicted": float(cols["diffin_target"][mask].sum()),
                              "update_first_order": diag["first_order_target_change"],
                              "update_change": upd["bank"] - full["bank"], "actual_change": float(actual_mean[j])})
        out.append(json.loads(p.read_text()))
        log.info("deletion check %d: %s", j, out[-1])
    return out


def markdown(r) -> str:
    L = []
    for v in r["variants"]:
        L += [f"\n{v['variant']} pool ({v['subsets']} subsets of half the pool; noise: subset-effect std "
              f"{v['noise_floor']['subset_effect_std']:.4f}, full-pool retrain-seed std "
              f"{v['noise_floor']['full_pool_retrain_seed_std']:.4f}):", "",
              "| method | LDS per target pair [95% CI] | LDS mean target loss [95% CI] |", "|---|---|---|"]
        for m, x in v["methods"].items():
            L.append(f"| {m} | {x['lds']:.3f} [{x['lds_ci'][0]:.3f}, {x['lds_ci'][1]:.3f}] | "
                     f"{x['lds_mean_target']:.3f} [{x['lds_mean_target_ci'][0]:.3f}, {x['lds_mean_target_ci'][1]:.3f}] |")
        L.append("")
        L.append("jobs' own columns, mean target: " + ", ".join(f"{c} {x:.3f}"
                                                               for c, x in v["job_columns_lds_mean_target"].items()))
    return "\n".join(L)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for n in ("counterfactual", "quality"):
        logging.getLogger(n).setLevel(logging.INFO)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.gettempdir()) / "pruner-counterfactual" / settings_hash(a)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(a.data_dir)
    classnames = ql.load_classnames(data)
    train = ql.read_split(data, "train")
    variants = [run_variant(a, v, work, train, classnames) for v in a.variant_list]
    lds_avg = {m: float(np.mean([v["methods"][m]["lds"] for v in variants])) for m in METHODS}
    r = {"lds": lds_avg,
         "lds_ci": {m: {v["variant"]: v["methods"][m]["lds_ci"] for v in variants} for m in METHODS},
         "lds_mean_target": {m: {v["variant"]: v["methods"][m]["lds_mean_target"] for v in variants} for m in METHODS},
         "noise_floor": {v["variant"]: v["noise_floor"] for v in variants},
         "subsets": a.subsets, "variants": variants,
         "config": {k: getattr(a, k) for k in SETTINGS} | {"forms": a.form_list, "retrain_seeds": a.retrain_seeds,
                                                           "noise_runs": a.noise_runs, "trak_damping": a.trak_damping,
                                                           "k_ablation": a.k_list, "work_dir": str(work)},
         "command": " ".join([".venv/bin/python", "benchmarks/counterfactual.py"] + [shlex.quote(x) for x in argv]),
         "wall_time_s": time.time() - t0, "machine": f"{platform.machine()} {os.cpu_count()} CPU cores"}
    ql.write_json(Path(a.out), r)
    print(markdown(r), flush=True)
    print(f"\nwrote {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
