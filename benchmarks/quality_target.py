"""Target-aware coreset benchmark: does influence pick the data that helps a target the user cares about better
than the filters a data team already runs?

    .venv/bin/python benchmarks/quality_target.py --seeds 0,1,2         # the recorded CPU run (pruner-micro)
    .venv/bin/python benchmarks/quality_target.py --merge a.json b.json --out benchmarks/results/quality_target.json

Problem (per seed, all seeded by it): a pool of ``--pool-size`` CIFAR-10 training pairs from all 10 classes, with
``--rare-classes`` of them rare (``--rare-weight`` of a frequent class's share) and ``--noise`` of the captions
swapped across classes (quality_lib.build_problem). For each target size in ``--target-sizes`` (default 3 and 5
classes) a seeded subset of the classes is the user's target, including ``--rare-in-target`` rare classes (by
default all of them rare: the target is a niche of the lake, 10% / 17% of the pool, as a target drawn from a
web-scale pool would be; with frequent target classes random selection already keeps 30-50% target pairs); its
target set is ``--per-class`` clean pairs of each target class, held out from the train split (disjoint from the
pool). Evaluation uses the TEST split only: zero-shot top-1 among the target classes (N-way) and among all 10 on
the target classes' test images, and class-level retrieval recall@1 on ``--retrieval-size`` of those test pairs.

Pipeline per seed: train the proxy (pruner train-proxy's trainer); per target, one prune job through the Ray
service with the default methods and the target set (pruner.jobs.prune.run, features saved), then every
selection below at each ``--keep-fractions`` budget; each coreset is retrained from scratch with the same seed and
steps as the proxy (retrainings are cached by the hash of their key set, so selections that keep the same
samples share one run).

A clearly trained proxy (``--pretrain-steps``): the CLIP model a data team filters with already knows the domain
(it was trained on other data). The proxy is then first trained ``--pretrain-steps`` on ``--pretrain-size`` clean
pairs of the train split outside the pool and every target set (all classes, class-balanced, seeded), and its
trajectory is a ``--steps`` fine-tune of that model on the pool at ``--finetune-lr`` (pruner train-proxy
``--pretrained``). The coresets are still retrained from scratch, as before. Each problem records the pretrained
model's own zero-shot under ``pretrained_proxy``.

The proxy's size (``--proxy-arch``): the proxy is that model (its training, the prune job, the similarity
baselines, ``proxy`` in each problem), while every coreset is still retrained as ``--arch``, so the selections of two
proxy sizes are compared on the same retraining.

Selections. Baselines: ``random``, ``clip_score`` and ``loss`` (the proxy's last checkpoint), ``similarity``
(cosine of the pool image's embedding with the mean target image embedding), ``similarity_nn`` (with the nearest
target image), ``intersection`` and ``intersection_nn`` (the CLIP-score top-k within the 2k most similar: the
DataComp-style intersection of an image-based and a CLIP-score filter). Influence: every ``--influence`` column of
the job (``tracin_target``, ``diffin_target`` in the job's form, ...), and the same after a filter stage
(``filter>X``: drop the lowest ``--filter-fraction`` by the product's filter statistic,
pruner.config.TARGET_FREE_SCORE: the proxy's loss, in runs before commit 2109c3c the CLIP score; rank the rest by X).
The default pipeline, ``filter>diffin_target:propagated``, is the product's (quality_lib.pipeline_score): after the
filter stage, the niche test (``--niche-alpha``) of diffin_target; with a niche the passing samples are ranked by
diffin_target, without one every sample by the filter statistic; each problem records the test under
``niche_test``, and ``filter>diffin_target (no niche test)`` is the pipeline without it. ``--explore`` adds Diff-In
forms computed here from the job's stored features (pruner.scores.propagation) before they are a job
option.

Result: ``--out`` (JSON, atomic) with ``target_zero_shot`` (selection -> {"keep_<f>": mean N-way accuracy over
seeds and targets}), ``best_baseline``, ``default_score``, ``per_problem`` and the configuration; a markdown table on
stdout. Work and caches in ``--work-dir``.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
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
from pruner.config import TARGET_FREE_SCORE  # noqa: E402

log = logging.getLogger("quality_target")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality_target.json"
BASELINES = ["random", "clip_score", "loss", "similarity", "similarity_nn", "intersection", "intersection_nn"]
#: the selection pruner's default job makes with a target set (select.score / filter_score auto, propagated form)
DEFAULT_PIPELINE = "filter>diffin_target:propagated"
JOB_COLUMNS = {"random": "baseline_random", "clip_score": "baseline_clip_score", "loss": "baseline_loss"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--work-dir", help="default: $TMPDIR/pruner-quality-target/<settings hash>")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seeds", default="0,1,2", help="comma list")
    p.add_argument("--pool-size", type=int, default=5000)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--rare-classes", type=int, default=5)
    p.add_argument("--rare-weight", type=float, default=0.2)
    p.add_argument("--target-sizes", default="3,5", help="classes per target set (comma list)")
    p.add_argument("--rare-in-target", default="3,5", help="rare classes in each target set (comma list, aligned): "
                   "by default every target class is rare in the pool (10%% / 17%% of it), the use case of a target "
                   "that is a niche of the lake")
    p.add_argument("--per-class", type=int, default=10, help="clean target pairs per target class")
    p.add_argument("--keep-fractions", default="0.3,0.1")
    p.add_argument("--influence", default="tracin_target", help="job columns ranked as influence (besides Diff-In's, "
                   "which come from --diffin-forms)")
    p.add_argument("--diffin-forms", default="propagated,exact_increment", help="Diff-In forms, one prune job each "
                   "(scores.diffin.form); their diffin_target columns are named diffin_target:<form>")
    p.add_argument("--explore", default="", help="comma list of Diff-In forms computed from stored features: "
                   "propagated, propagated_adam, propagated_own")
    p.add_argument("--filter-fraction", type=float, default=0.2, help="the filter stage's share dropped by "
                   "pruner.config.TARGET_FREE_SCORE")
    p.add_argument("--niche-alpha", type=float, default=1e-3, help="the default pipeline's niche test level "
                   "(select.niche_alpha)")
    p.add_argument("--arch", default="pruner-micro", help="the model every coreset is retrained as")
    p.add_argument("--proxy-arch", help="the proxy's model, the one the job scores with (default: --arch); a "
                   "different size measures how the selections move with the proxy's size")
    p.add_argument("--bare-checkpoints", action="store_true", help="score from copies of the proxy's checkpoints "
                   "without their optimiser state (what a released model or a bare state dict gives): Diff-In's "
                   "step scale is then estimated (scores.diffin.train_batch_size at its default)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--pretrain-steps", type=int, default=0, help="pretrain the proxy this many steps on clean pairs "
                   "outside the pool, then fine-tune it on the pool (0: the proxy is trained on the pool from scratch)")
    p.add_argument("--pretrain-size", type=int, default=20000, help="clean pretraining pairs (--pretrain-steps)")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="the proxy's peak LR on the pool after "
                   "pretraining (--pretrain-steps; the coresets' retraining keeps --lr)")
    p.add_argument("--bank-size", type=int, default=1024)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--curvature-samples", type=int, default=2048, help="--explore: subsample for the sketched K")
    p.add_argument("--retrieval-size", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--actors", type=int, default=1, help="Ray scoring actors")
    p.add_argument("--selections", default="", help="only these selections (comma list; default all)")
    p.add_argument("--no-retrain", action="store_true", help="selection statistics only (no coreset training)")
    a = p.parse_args(argv)
    a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.keep_list = [float(f) for f in a.keep_fractions.split(",") if f]
    a.size_list = [int(s) for s in a.target_sizes.split(",") if s]
    a.rare_list = [int(s) for s in a.rare_in_target.split(",") if s]
    a.influence_list = [x for x in a.influence.split(",") if x]
    a.form_list = [x for x in a.diffin_forms.split(",") if x]
    a.explore_list = [x for x in a.explore.split(",") if x]
    a.only = {x for x in a.selections.split(",") if x}
    a.proxy_arch = a.proxy_arch or a.arch
    if len(a.rare_list) != len(a.size_list):
        p.error("--rare-in-target needs one count per --target-sizes entry")
    return a


SETTINGS = ("data_dir", "pool_size", "noise", "rare_classes", "rare_weight", "target_sizes", "rare_in_target",
            "per_class", "arch", "steps", "batch_size", "lr", "checkpoints", "bank_size", "k")


PRETRAIN_SETTINGS = ("pretrain_steps", "pretrain_size", "finetune_lr")


def settings(a) -> dict:
    """What the work dir's caches depend on (the pretraining settings only when there is pretraining and the proxy's
    model only when it is not the retrained one, so that the earlier runs keep their work dirs)."""
    extra = (PRETRAIN_SETTINGS if a.pretrain_steps else ()) + (("proxy_arch",) if a.proxy_arch != a.arch else ())
    return {k: getattr(a, k) for k in SETTINGS + extra}


def settings_hash(a) -> str:
    return ql.settings_hash(settings(a))


# ---------------------------------------------------------------------------------------------------------------
def pick_targets(a, seed: int, rare: list[int], n_cls: int) -> list[list[int]]:
    """Per target size, a seeded class subset holding the asked number of rare classes."""
    rng = np.random.default_rng(30_000 + seed)
    frequent = [c for c in range(n_cls) if c not in rare]
    out = []
    for size, n_rare in zip(a.size_list, a.rare_list):
        r = rng.choice(rare, min(n_rare, len(rare)), replace=False).tolist()
        f = rng.choice(frequent, size - len(r), replace=False).tolist()
        out.append(sorted(r + f))
    return out


def target_samples(train, pool_keys: set, classes: list[int], per_class: int, seed: int):
    rng = np.random.default_rng(40_000 + seed)
    out = []
    for c in classes:
        cand = [s for s in train if s.label == c and s.key not in pool_keys]
        out += [cand[i] for i in np.sort(rng.choice(len(cand), per_class, replace=False))]
    return out


def pretrain_samples(train, exclude: set, size: int, seed: int):
    """``size`` clean train pairs outside ``exclude`` (the pool and every target set), class-balanced, seeded."""
    rest = [s for s in train if s.key not in exclude]
    rng = np.random.default_rng(70_000 + seed)
    by_class: dict[int, list] = {}
    for i in rng.permutation(len(rest)):
        by_class.setdefault(rest[i].label, []).append(rest[i])
    per = size // len(by_class)
    short = {c: len(v) for c, v in by_class.items() if len(v) < per}
    if short:
        raise SystemExit(f"--pretrain-size {size}: classes {short} have fewer than {per} pairs outside the pool")
    return sorted((s for c in sorted(by_class) for s in by_class[c][:per]), key=lambda s: s.key)


def job_config(a, seed: int, out_dir: Path, traj: Path, pool_dir: Path, target_dir: Path, n_target: int,
               form: str) -> dict:
    """The prune job: the default methods and Diff-In targets, the target set, Diff-In's ``form``, features saved (for
    --explore)."""
    return {
        "name": "qt", "output_dir": str(out_dir), "seed": seed,
        "data": {"shards": [str(pool_dir)]},
        "target": {"shards": [str(target_dir)], "max_samples": n_target},
        "model": {"arch": a.proxy_arch, "device": "cpu"},
        "trajectory": {"file": str(traj)},
        "features": {"k": a.k, "bank_size": a.bank_size, "batch_size": 64, "save": True},
        "scores": {"diffin": {"form": form}, "oga": {"iforest_sample": min(2000, a.pool_size)}},
        "select": {"score": "diffin_target", "keep_fraction": 0.5},
        "ray": {"num_actors": a.actors, "cpus_per_actor": 1},
    }


@torch.no_grad()
def image_embeddings(model, preprocess, samples, bs: int = 500) -> torch.Tensor:
    from PIL import Image
    out = []
    for i in range(0, len(samples), bs):
        x = torch.stack([preprocess(Image.open(io.BytesIO(s.jpg)).convert("RGB")) for s in samples[i:i + bs]])
        out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(out)


def similarity_scores(model, preprocess, pool, target) -> dict[str, np.ndarray]:
    """Image-embedding similarity of every pool image to the target images at the proxy's last checkpoint."""
    pe, te = image_embeddings(model, preprocess, pool), image_embeddings(model, preprocess, target)
    mean = torch.nn.functional.normalize(te.mean(0), dim=0)
    return {"similarity": (pe @ mean).double().numpy(), "similarity_nn": (pe @ te.T).max(1).values.double().numpy()}


def top_k(score, uids, k: int) -> np.ndarray:
    return ql.rank_order(score, uids)[:k]


def intersection(clip, sim, uids, k: int) -> np.ndarray:
    """The CLIP-score top-k among the 2k most similar pool samples."""
    cand = top_k(sim, uids, min(len(sim), 2 * k))
    return cand[top_k(clip[cand], uids[cand], k)]


def filtered(score, filter_score, uids, k: int, frac: float) -> np.ndarray:
    """The filter stage then the score: the top-k by ``score`` among the samples outside the lowest ``frac`` by
    ``filter_score`` (all of them when fewer than k pass)."""
    n_pass = len(filter_score) - int(math.floor(frac * len(filter_score)))
    passed = top_k(filter_score, uids, n_pass)
    if len(passed) < k:
        return top_k(filter_score, uids, k)
    return passed[top_k(score[passed], uids[passed], k)]


# ---------------------------------------------------------------------------------------------------------------
def explore_scores(a, cfg, layout, traj, pool_order: list[str]) -> dict[str, np.ndarray]:
    """Diff-In forms from the job's stored features, aligned to ``pool_order`` (uids)."""
    import pyarrow.parquet as pq

    from pruner.io.shards import expand_shard_specs
    from pruner.io.store import load_features
    from pruner.jobfiles import JobFiles
    from pruner.rescore import target_projections
    from pruner.model.checkpoints import adam_step_scale
    from pruner.scores.propagation import curvature, propagated_directions
    pool = expand_shard_specs(cfg.data.shards)
    m = len(traj.checkpoints)
    feats = [[] for _ in range(m)]
    uids = []
    for url in pool:
        uids += pq.read_table(layout.scores(url), columns=["uid"])["uid"].to_pylist()
        for i in range(m):
            feats[i].append(np.asarray(load_features(layout.features(url, i)), np.float32))
    feats = [torch.from_numpy(np.concatenate(f)) for f in feats]
    pos = {u: j for j, u in enumerate(uids)}
    order = np.array([pos[u] for u in pool_order])
    rng = np.random.default_rng(50_000)
    sub = np.sort(rng.choice(len(uids), min(a.curvature_samples, len(uids)), replace=False))
    curv = [curvature(f[sub]) for f in feats]
    projs = target_projections(JobFiles(layout), list(cfg.target.shards), device="cpu")
    tj = json.loads(layout.trajectory.read_text())["checkpoints"]
    h = [float(c["eta"]) for c in tj]  # lr * updates: the summed step size
    b = [float(c["b_t"]) for c in tj]
    scales = []
    for ck in traj.checkpoints:
        opt = torch.load(ck.path, map_location="cpu", weights_only=True).get("optimizer") or {}
        st = list((opt.get("state") or {}).values())
        beta2, eps = (opt["param_groups"][0]["betas"][1], opt["param_groups"][0]["eps"]) if st else (0.999, 1e-8)
        scales.append(adam_step_scale([s["exp_avg_sq"] for s in st], [int(s["step"]) for s in st], beta2, eps)
                      if st else 1.0)
    out = {}
    pv_last = projs[-1]["Pv"].double()
    for form in a.explore_list:
        if form in ("propagated", "propagated_adam"):
            hh = h if form == "propagated" else [x * s for x, s in zip(h, scales)]
            w = propagated_directions(pv_last, curv, hh, b)
        elif form == "propagated_own":  # each checkpoint's own target, damped within its interval only
            w = [propagated_directions(p["Pv"].double(), [c], [x], [bb])[0] for p, c, x, bb in zip(projs, curv, h, b)]
        else:
            raise SystemExit(f"--explore: unknown form {form!r}")
        score = sum((f.double() @ wc) for f, wc in zip(feats, w))
        out[f"diffin_{form}"] = score.numpy()[order]
    out["_diag"] = {"adam_step_scale": scales, "curvature_top": [float(c.eigvals[0]) for c in curv],
                    "h": h, "h_top_eig": [x * float(c.eigvals[0]) for x, c in zip(h, curv)]}
    return out


# ---------------------------------------------------------------------------------------------------------------
class TargetEval:
    """The target classes' test images (zero-shot N-way among them and 10-way) and retrieval pairs."""

    def __init__(self, arch, test, classnames, classes: list[int], retrieval_size: int, seed: int):
        from PIL import Image

        from pruner.model.clip import create_clip
        _, pre, tok = create_clip(arch)
        self.classes = classes
        sel = [s for s in test if s.label in classes]
        self.images = torch.stack([pre(Image.open(io.BytesIO(s.jpg)).convert("RGB")) for s in sel])
        self.labels = torch.tensor([s.label for s in sel])
        prompts = ql.zero_shot_prompts(classnames["classnames"], classnames["templates"])
        self.n_t = len(prompts[0])
        self.prompt_tokens = tok([p for ps in prompts for p in ps])
        rng = np.random.default_rng(60_000 + seed)
        self.ret = torch.as_tensor(np.sort(rng.permutation(len(sel))[:retrieval_size]))
        self.ret_tokens = tok([sel[i].caption for i in self.ret.tolist()])

    @torch.no_grad()
    def __call__(self, model) -> dict:
        img = ql._encode(model, images=self.images)
        n_cls = self.prompt_tokens.shape[0] // self.n_t
        cls = ql._encode(model, tokens=self.prompt_tokens).view(n_cls, self.n_t, -1).mean(1)
        cls = torch.nn.functional.normalize(cls, dim=-1)
        logits = img @ cls.T
        sub = torch.tensor(self.classes)
        n_way = sub[logits[:, sub].argmax(1)]
        ri, rt = img[self.ret], ql._encode(model, tokens=self.ret_tokens)
        lab = self.labels[self.ret]
        return {"zero_shot_target": float((n_way == self.labels).float().mean()),
                "zero_shot_10way": float((logits.argmax(1) == self.labels).float().mean()),
                "recall_class_i2t_r1": float((lab[(ri @ rt.T).argmax(1)] == lab).float().mean()),
                "recall_class_t2i_r1": float((lab[(rt @ ri.T).argmax(1)] == lab).float().mean())}


def work_dir(a) -> Path:
    """The run's work dir: ``--work-dir``, else one per settings under the temporary directory."""
    return Path(a.work_dir) if a.work_dir else Path(tempfile.gettempdir()) / "pruner-quality-target" / settings_hash(a)


def seed_pool(a, train, n_cls: int, seed: int):
    """The seed's pool with its swapped captions (quality_lib.build_problem) under the run's settings ``a``: what
    run_seed scores, and what the scripts that re-use a run's stored jobs rebuild."""
    return ql.build_problem(train, a.pool_size, 0, a.noise, seed, n_cls, a.rare_classes, a.rare_weight)


def retrain(a, seed: int, pool_by_key: dict, keys: list[str], ev: TargetEval, tag: str) -> dict:
    """Cached in the run's work dir: train from scratch on ``keys`` (same seed and steps as the proxy) and evaluate
    on the target."""
    rd = work_dir(a) / "runs" / f"seed-{seed}" / ql.keyset_hash(keys)
    res_p = rd / f"eval-{tag}.json"
    if res_p.exists():
        return json.loads(res_p.read_text())
    t0 = time.time()
    if not (rd / "trajectory.json").exists():
        ql.train_run(rd, [pool_by_key[k] for k in keys], arch=a.arch, steps=a.steps, batch_size=a.batch_size,
                     lr=a.lr, seed=seed, device="cpu", log_every=1000)
        ql.drop_optimizer_state(rd)
    model = ql.load_model(ql.last_checkpoint(rd), a.arch, "cpu")
    res = {"n": len(keys), **ev(model), "seconds": time.time() - t0}
    ql.write_json(res_p, res)
    return res


def bare_copy(traj_path: Path, out: Path) -> Path:
    """Copies of a train-proxy trajectory's checkpoints as bare OpenCLIP checkpoints (``step`` and ``state_dict``, no
    optimiser state) under ``out``, with a trajectory file listing them as the original does; returns its path."""
    from pruner.model.checkpoints import load_state_dict
    traj = json.loads(traj_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    for c in traj["checkpoints"]:
        src = (traj_path.parent / c["path"]).resolve()
        if not (out / src.name).exists():
            torch.save({"step": c["step"], "state_dict": load_state_dict(str(src))}, out / src.name)
        c["path"] = src.name
    ql.write_json(out / "trajectory.json", traj)
    return out / "trajectory.json"


def run_seed(a, seed: int, work: Path, train, test, classnames) -> list[dict]:
    import pyarrow.parquet as pq

    from pruner.config import load_config
    from pruner.model.checkpoints import load_trajectory
    from pruner.scores.combine import RANKING_COLUMNS, SAMPLE_COLUMNS
    from quality import run_prune_job
    n_cls = len(classnames["classnames"])
    sd = work / f"seed-{seed}"
    prob = seed_pool(a, train, n_cls, seed)
    keys, uids = prob.keys, np.array(prob.keys)
    pool_by_key = {s.key: s for s in prob.pool}
    pool_dir = sd / "pool"
    if not (sd / "pool.json").exists():
        ql.write_shards(prob.pool, pool_dir, "pool")
        ql.write_json(sd / "pool.json", {"keys": keys, "swapped": prob.swapped.tolist(), "rare": prob.rare_classes})
    targets = [(classes, target_samples(train, set(keys), classes, a.per_class, seed))
               for classes in pick_targets(a, seed, prob.rare_classes, n_cls)]
    pretrained, lr = None, a.lr
    if a.pretrain_steps:
        pre = pretrain_samples(train, set(keys) | {s.key for _, t in targets for s in t}, a.pretrain_size, seed)
        pretrained = ql.last_checkpoint(ql.train_run(sd / "pretrain", pre, arch=a.proxy_arch, steps=a.pretrain_steps,
                                                     batch_size=a.batch_size, lr=a.lr, seed=seed, device="cpu",
                                                     log_every=500))
        lr = a.finetune_lr
    proxy = ql.train_run(sd / ("proxy-pretrained" if pretrained else "proxy"), prob.pool, arch=a.proxy_arch,
                         steps=a.steps, batch_size=a.batch_size, lr=lr, seed=seed, device="cpu",
                         checkpoints=a.checkpoints, log_every=100, pretrained=pretrained)
    traj_path = bare_copy(proxy / "trajectory.json", sd / "proxy-bare") if a.bare_checkpoints else \
        proxy / "trajectory.json"
    traj = load_trajectory(file=str(traj_path))
    proxy_model = ql.load_model(traj.checkpoints[-1].path, a.proxy_arch, "cpu")
    pretrained_model = ql.load_model(pretrained, a.proxy_arch, "cpu") if pretrained else None
    from pruner.model.clip import create_clip
    _, preprocess, _ = create_clip(a.proxy_arch)
    out = []
    for classes, tgt in targets:
        name = "t" + "-".join(map(str, classes))
        td = sd / name
        if not (td / "target").exists():
            ql.write_shards(tgt, td / "target", "target", min_shards=1)
        cols, score_s = {}, {}
        for form in a.form_list:
            cfg = load_config(data=job_config(a, seed, td / "jobs", traj_path, pool_dir, td / "target", len(tgt),
                                              form), check_paths=False)
            t0 = time.time()
            layout, _, _ = run_prune_job(cfg)
            score_s[form] = time.time() - t0
            t = pq.read_table(layout.ranking).to_pydict()
            pos = {u: i for i, u in enumerate(t["uid"])}
            order = np.array([pos[k] for k in keys])
            if not cols:  # the columns no Diff-In form changes, from the first job
                cols = {k: np.asarray(v, np.float64)[order] for k, v in t.items()
                        if k not in SAMPLE_COLUMNS + RANKING_COLUMNS and not k.startswith(("c", "diffin"))}
            cols[f"diffin_target:{form}"] = np.asarray(t["diffin_target"], np.float64)[order]
        cols.update(similarity_scores(proxy_model, preprocess, prob.pool, tgt))
        diag = {}
        if a.explore_list:
            ex = explore_scores(a, cfg, layout, traj, keys)
            diag = ex.pop("_diag")
            cols.update(ex)
        ev = TargetEval(a.arch, test, classnames, classes, a.retrieval_size, seed)
        ev_proxy = ev if a.proxy_arch == a.arch else TargetEval(a.proxy_arch, test, classnames, classes,
                                                                 a.retrieval_size, seed)
        labels, swapped = prob.labels, prob.swapped
        useful = np.isin(labels, classes) & ~swapped  # correctly captioned pairs of a target class
        prob_res = {"seed": seed, "classes": classes, "rare_in_target": [c for c in classes if c in prob.rare_classes],
                    "scoring_seconds": score_s, "proxy": ev_proxy(proxy_model), "diagnostics": diag,
                    "selections": {}}
        if pretrained_model is not None:
            prob_res["pretrained_proxy"] = ev_proxy(pretrained_model)
        influence = a.influence_list + [f"diffin_target:{f}" for f in a.form_list] + \
            [f"diffin_{f}" for f in a.explore_list]
        sels: dict[str, callable] = {}
        for b in BASELINES:
            if b in JOB_COLUMNS:
                sels[b] = (lambda col: lambda k: top_k(cols[col], uids, k))(JOB_COLUMNS[b])
        sels["similarity"] = lambda k: top_k(cols["similarity"], uids, k)
        sels["similarity_nn"] = lambda k: top_k(cols["similarity_nn"], uids, k)
        sels["intersection"] = lambda k: intersection(cols["baseline_clip_score"], cols["similarity"], uids, k)
        sels["intersection_nn"] = lambda k: intersection(cols["baseline_clip_score"], cols["similarity_nn"], uids, k)
        for m in influence:
            sels[m] = (lambda col: lambda k: top_k(cols[col], uids, k))(m)
            sels[f"filter>{m}"] = (lambda col: lambda k: filtered(cols[col], cols[TARGET_FREE_SCORE], uids, k,
                                                                  a.filter_fraction))(m)
        if DEFAULT_PIPELINE in sels:  # the product's pipeline: filter stage, niche test (pruner.select.stages)
            pipe, prob_res["niche_test"] = ql.pipeline_score(cols["diffin_target:propagated"],
                                                             cols[TARGET_FREE_SCORE], uids, a.filter_fraction,
                                                             a.niche_alpha)
            sels[DEFAULT_PIPELINE] = lambda k: top_k(pipe, uids, k)
            sels["filter>diffin_target (no niche test)"] = lambda k: filtered(
                cols["diffin_target:propagated"], cols[TARGET_FREE_SCORE], uids, k, a.filter_fraction)
        for sname, fn in sels.items():
            if a.only and sname not in a.only:
                continue
            for f in a.keep_list:
                idx = fn(int(math.floor(f * len(keys) + 1e-9)))
                row = {"target_share": float(useful[idx].mean()), "swapped_share": float(swapped[idx].mean()),
                       "target_class_share": float(np.isin(labels[idx], classes).mean())}
                if not a.no_retrain:
                    row.update(retrain(a, seed, pool_by_key, sorted(keys[i] for i in idx), ev, name))
                prob_res["selections"].setdefault(sname, {})[f"keep_{f}"] = row
                log.info("seed %d %s %s keep %.2f: %s", seed, name, sname, f,
                         {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
                ql.write_json(td / "partial.json", prob_res)
        out.append(prob_res)
    return out


# ---------------------------------------------------------------------------------------------------------------
def paired(problems: list[dict], a: str, b: str, keep: str) -> dict:
    """Target zero-shot of selection a minus b on the same problems: the comparison the problems' spread (3-way and
    5-way targets of different difficulty) would swamp as a difference of means. Points of accuracy."""
    d = [100 * (p["selections"][a][keep]["zero_shot_target"] - p["selections"][b][keep]["zero_shot_target"])
         for p in problems if keep in p["selections"].get(a, {}) and keep in p["selections"].get(b, {})]
    seeds = sorted({p["seed"] for p in problems})
    per_seed = [float(np.mean([x for x, p in zip(d, problems) if p["seed"] == s])) for s in seeds]
    return {"a": a, "b": b, "mean_points": float(np.mean(d)), "sd_points": float(np.std(d, ddof=1)),
            "per_seed_mean_points": per_seed, "wins": int(sum(x > 0 for x in d)), "problems": len(d)}


def summarize(problems: list[dict], config: dict, command: str, wall: float) -> dict:
    keep = [f"keep_{f}" for f in config["keep_fractions"]]
    names = [s for s in problems[0]["selections"] if all(s in p["selections"] for p in problems)]

    def stat(metric):
        mean, sd = {}, {}
        for s in names:
            for k in keep:
                v = [p["selections"][s][k].get(metric) for p in problems if k in p["selections"][s]]
                v = [x for x in v if x is not None]
                if v:
                    mean.setdefault(s, {})[k] = float(np.mean(v))
                    sd.setdefault(s, {})[k] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        return mean, sd

    r = {}
    for metric in ("zero_shot_target", "zero_shot_10way", "recall_class_i2t_r1", "recall_class_t2i_r1",
                   "target_share", "swapped_share", "target_class_share"):
        r[metric], r[f"{metric}_sd"] = stat(metric)
    r["target_zero_shot"] = r.pop("zero_shot_target")
    r["target_zero_shot_sd"] = r.pop("zero_shot_target_sd")
    base = [b for b in BASELINES if b in r["target_zero_shot"]]
    if base and keep[0] in r["target_zero_shot"].get(base[0], {}):
        r["best_baseline"] = {k: max(base, key=lambda b: r["target_zero_shot"][b].get(k, -1)) for k in keep}
    r["default_score"] = DEFAULT_PIPELINE if DEFAULT_PIPELINE in names else None
    if r.get("best_baseline") and r["default_score"]:
        r["default_vs_best_baseline"] = {k: paired(problems, DEFAULT_PIPELINE, r["best_baseline"][k], k) for k in keep}
    pairs = [("diffin_target:propagated", "tracin_target"), ("filter>diffin_target:propagated", "filter>tracin_target")]
    r["diffin_vs_tracin"] = {f"{a} - {b}": {k: paired(problems, a, b, k) for k in keep}
                             for a, b in pairs if a in names and b in names}
    r["seeds"] = sorted({p["seed"] for p in problems})
    r["problems"] = [{"seed": p["seed"], "classes": p["classes"], "rare_in_target": p["rare_in_target"]}
                     for p in problems]
    r["proxy_zero_shot_target"] = float(np.mean([p["proxy"]["zero_shot_target"] for p in problems]))
    r["proxy_zero_shot_10way"] = float(np.mean([p["proxy"]["zero_shot_10way"] for p in problems]))
    if all("pretrained_proxy" in p for p in problems):
        r["pretrained_proxy_zero_shot_10way"] = float(np.mean([p["pretrained_proxy"]["zero_shot_10way"]
                                                               for p in problems]))
    r["config"] = config
    r["per_problem"] = problems
    r["command"], r["wall_time_s"] = command, wall
    r["machine"] = f"{platform.machine()} {os.cpu_count()} CPU cores"
    return r


def markdown(r) -> str:
    keep = [f"keep_{f}" for f in r["config"]["keep_fractions"]]
    L = ["| selection | " + " | ".join(f"target ZS {k[5:]}" for k in keep) + " | "
         + " | ".join(f"10-way {k[5:]}" for k in keep) + " | " + " | ".join(f"useful kept {k[5:]}" for k in keep)
         + " | " + " | ".join(f"swapped kept {k[5:]}" for k in keep) + " |",
         "|---|" + "---|" * (4 * len(keep))]
    zs, sd = r["target_zero_shot"], r["target_zero_shot_sd"]

    def pct(x, s=None):
        return "" if x is None else f"{100 * x:.1f}" + (f" ± {100 * s:.1f}" if s is not None else "")

    for s in zs:
        row = [s] + [pct(zs[s].get(k), sd[s].get(k)) for k in keep]
        row += [pct(r["zero_shot_10way"].get(s, {}).get(k)) for k in keep]
        row += [pct(r["target_share"].get(s, {}).get(k)) for k in keep]
        row += [pct(r["swapped_share"].get(s, {}).get(k)) for k in keep]
        L.append("| " + " | ".join(row) + " |")
    pre = r.get("pretrained_proxy_zero_shot_10way")
    L.append(f"\nproxy (full noisy pool) target zero-shot: {pct(r['proxy_zero_shot_target'])}, 10-way "
             f"{pct(r.get('proxy_zero_shot_10way'))}"
             f"{'' if pre is None else f' (pretrained, before the pool: {pct(pre)})'}"
             f"; best baseline: {r.get('best_baseline')}")
    for name, by_keep in [("default - best baseline", r.get("default_vs_best_baseline", {}))] + \
            list(r.get("diffin_vs_tracin", {}).items()):
        L.append(f"{name}: " + "; ".join(f"{k[5:]}: {v['mean_points']:+.1f} ± {v['sd_points']:.1f} points "
                                         f"({v['wins']}/{v['problems']} problems)" for k, v in by_keep.items()))
    return "\n".join(L)


def merge(paths: list[str], out: str) -> int:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    problems = [p for d in docs for p in d["per_problem"]]
    r = summarize(problems, docs[0]["config"], " ; ".join(d["command"] for d in docs),
                  max(d["wall_time_s"] for d in docs))
    ql.write_json(Path(out), r)
    print(markdown(r))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--merge":
        rest = argv[1:]
        out = rest[rest.index("--out") + 1] if "--out" in rest else str(DEFAULT_OUT)
        return merge([x for j, x in enumerate(rest) if x != "--out" and (j == 0 or rest[j - 1] != "--out")], out)
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("quality_target", "quality"):
        logging.getLogger(name).setLevel(logging.INFO)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    work = work_dir(a)
    work.mkdir(parents=True, exist_ok=True)
    log.info("work dir %s", work)
    data = Path(a.data_dir)
    classnames = ql.load_classnames(data)
    train, test = ql.read_split(data, "train"), ql.read_split(data, "test")
    problems = [p for seed in a.seed_list for p in run_seed(a, seed, work, train, test, classnames)]
    config = settings(a) | {
        "keep_fractions": a.keep_list, "influence": a.influence_list, "diffin_forms": a.form_list,
        "explore": a.explore_list, "proxy_arch": a.proxy_arch, "bare_checkpoints": a.bare_checkpoints,
        "filter_fraction": a.filter_fraction, "curvature_samples": a.curvature_samples,
        "retrieval_size": a.retrieval_size, "threads": a.threads, "work_dir": str(work),
        "evaluation": "zero-shot top-1 on the target classes' TEST images, N-way among the target classes "
                      "(target_zero_shot) and 10-way; class-level retrieval R@1 on target-class test pairs"}
    command = " ".join([".venv/bin/python", "benchmarks/quality_target.py"] + [shlex.quote(x) for x in argv])
    r = summarize(problems, config, command, time.time() - t0)
    ql.write_json(Path(a.out), r)
    print(markdown(r), flush=True)
    print(f"\nwrote {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
