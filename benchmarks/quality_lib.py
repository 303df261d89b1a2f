"""Helpers of the quality benchmark (``benchmarks/quality.py``): the noisy CIFAR-10 problem, shard writing,
retraining, zero-shot / retrieval evaluation, target losses, detection metrics, the Diff-In parameter-space update,
and seed aggregation. No Ray and no CLI here.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pruner.io.atomic import write_json_atomic

SPLIT_DIRS = ("train", "test")


# ---------------------------------------------------------------------------------------------------------------
# raw data
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RawSample:
    key: str
    jpg: bytes
    caption: str
    label: int


def read_split(data_dir: Path, split: str, max_shards: int = 0) -> list[RawSample]:
    """Every sample of one split (of its first ``max_shards`` shards when > 0), raw JPEG bytes kept (re-written
    unchanged into the benchmark's shards)."""
    out: list[RawSample] = []
    urls = sorted((data_dir / split).glob("*.tar*"))
    for url in urls[:max_shards] if max_shards > 0 else urls:
        parts: dict[str, dict] = {}
        order: list[str] = []
        with tarfile.open(url, "r|*") as tf:
            for m in tf:
                if not m.isfile() or "." not in m.name:
                    continue
                key, ext = m.name.split(".", 1)
                if key not in parts:
                    parts[key] = {}
                    order.append(key)
                parts[key][ext] = tf.extractfile(m).read()
        for key in order:
            p = parts[key]
            meta = json.loads(p["json"])
            out.append(RawSample(key=key, jpg=p["jpg"], caption=p["txt"].decode().strip(), label=int(meta["label"])))
    if not out:
        raise FileNotFoundError(f"no shards under {data_dir / split} (fix: --data-dir must hold train/ and test/)")
    return out


def load_classnames(data_dir: Path) -> dict:
    for p in (data_dir / "classnames.json", data_dir / "train" / "classnames.json"):
        if p.exists():
            return json.loads(p.read_text())
    raise FileNotFoundError(f"classnames.json not found in {data_dir}")


def zero_shot_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    def art(name: str) -> str:
        return "an" if name[:1].lower() in "aeiou" else "a"
    return [[t.format(art=art(n), name=n) for t in templates] for n in classnames]


# ---------------------------------------------------------------------------------------------------------------
# the noisy problem
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One seed's pool (with swapped captions), held-out target slice and ground truth."""

    pool: list[RawSample]           # captions already swapped where swapped[i]
    swapped: np.ndarray             # bool [n]
    caption_class: np.ndarray       # int [n]: class named by the (possibly swapped) caption
    target: list[RawSample]         # clean held-out slice of the train split (disjoint from the pool)
    rare_classes: list[int] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.pool])

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.pool]


def _stratified(order: Sequence[RawSample], quotas: dict[int, int], exclude: set) -> list[RawSample]:
    taken, counts = [], {c: 0 for c in quotas}
    for s in order:
        if s.key in exclude or counts.get(s.label, 0) >= quotas.get(s.label, 0):
            continue
        taken.append(s)
        counts[s.label] += 1
    short = {c: quotas[c] - counts[c] for c in quotas if counts[c] < quotas[c]}
    if short:
        raise ValueError(f"not enough samples for the class quotas (short: {short}); lower --pool-size")
    return taken


def _quotas(n: int, weights: np.ndarray) -> dict[int, int]:
    raw = n * weights / weights.sum()
    q = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - q))[: n - q.sum()]:
        q[i] += 1
    return {c: int(v) for c, v in enumerate(q)}


def build_problem(train: list[RawSample], pool_size: int, target_size: int, noise: float, seed: int,
                  num_classes: int, rare_classes: int = 0, rare_weight: float = 1.0) -> Problem:
    """Seeded pool (class-stratified; ``rare_classes`` seeded classes get ``rare_weight`` of a frequent class's
    share), a clean class-balanced target slice of the same split disjoint from it, and a cross-class caption swap
    of ``noise`` of the pool: the chosen pairs' captions are permuted among themselves so that every swapped
    caption names a different class than its image."""
    rng = np.random.default_rng(seed)
    order = [train[i] for i in rng.permutation(len(train))]
    rare = sorted(rng.choice(num_classes, rare_classes, replace=False).tolist()) if rare_classes else []
    w = np.array([rare_weight if c in rare else 1.0 for c in range(num_classes)])
    pool = _stratified(order, _quotas(pool_size, w), set())
    target = _stratified(order, _quotas(target_size, np.ones(num_classes)), {s.key for s in pool})
    pool = [pool[i] for i in rng.permutation(len(pool))]  # mix classes across shards
    n = len(pool)
    labels = np.array([s.label for s in pool])
    idx = np.sort(rng.choice(n, int(round(noise * n)), replace=False))
    perm = rng.permutation(len(idx))
    for _ in range(10000):  # repair same-class assignments by random transpositions (a class derangement)
        bad = np.nonzero(labels[idx[perm]] == labels[idx])[0]
        if len(bad) == 0:
            break
        for j in bad:
            k = rng.integers(len(idx))
            if labels[idx[perm[k]]] != labels[idx[j]] and labels[idx[perm[j]]] != labels[idx[k]]:
                perm[j], perm[k] = perm[k], perm[j]
    else:
        raise RuntimeError("could not swap captions across classes (too few classes in the swap set)")
    swapped = np.zeros(n, bool)
    cap_cls = labels.copy()
    new_pool = list(pool)
    for j, i in enumerate(idx):
        src = pool[idx[perm[j]]]
        new_pool[i] = RawSample(key=pool[i].key, jpg=pool[i].jpg, caption=src.caption, label=pool[i].label)
        swapped[i], cap_cls[i] = True, src.label
    assert (cap_cls[swapped] != labels[swapped]).all()
    return Problem(pool=new_pool, swapped=swapped, caption_class=cap_cls, target=target, rare_classes=rare)


# ---------------------------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------------------------
def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def write_shards(samples: Sequence[RawSample], out_dir: Path, prefix: str, per_shard: int = 250,
                 min_shards: int = 4) -> list[str]:
    """Plain .tar WebDataset shards (jpg, txt, json with uid = key and label). Returns the shard paths."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    n_shards = max(min(min_shards, len(samples)), math.ceil(len(samples) / per_shard))
    paths = []
    for j, chunk in enumerate(np.array_split(np.arange(len(samples)), n_shards)):
        path = out_dir / f"{prefix}-{j:06d}.tar"
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in chunk:
                s = samples[i]
                _tar_add(tf, f"{s.key}.jpg", s.jpg)
                _tar_add(tf, f"{s.key}.txt", s.caption.encode())
                _tar_add(tf, f"{s.key}.json", json.dumps({"uid": s.key, "label": s.label}).encode())
        tmp.rename(path)
        paths.append(str(path))
    return paths


def settings_hash(settings: dict) -> str:
    """A benchmark work directory's key: the settings its caches depend on, as sorted JSON (sha256, 12 hex)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def keyset_hash(keys: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# models and evaluation
# ---------------------------------------------------------------------------------------------------------------
def load_model(path: str, arch: str, device: str):
    """The linearised open_clip model of a checkpoint (eval mode, fp32)."""
    from pruner.model.checkpoints import load_scoring_model
    return load_scoring_model(path, arch, device=device)


class EvalSet:
    """Preprocessed evaluation tensors: the test split (zero-shot, retrieval) plus the target/bank pairs for the
    target loss. Built once per arch."""

    def __init__(self, arch: str, test: Sequence[RawSample], classnames: dict, retrieval_idx: np.ndarray):
        from PIL import Image

        from pruner.model.clip import create_clip
        _, self.preprocess, self.tokenizer = create_clip(arch)

        def images(samples):
            return torch.stack([self.preprocess(Image.open(io.BytesIO(s.jpg)).convert("RGB")) for s in samples])

        self.images_of = images
        self.test_images = images(test)
        self.test_labels = torch.tensor([s.label for s in test])
        self.prompts = zero_shot_prompts(classnames["classnames"], classnames["templates"])
        self.prompt_tokens = self.tokenizer([p for ps in self.prompts for p in ps])
        self.ret_idx = torch.as_tensor(retrieval_idx)
        self.ret_captions = [test[i].caption for i in retrieval_idx]
        self.ret_tokens = self.tokenizer(self.ret_captions)
        self.ret_labels = self.test_labels[self.ret_idx]
        ids = {c: i for i, c in enumerate(sorted(set(self.ret_captions)))}
        self.ret_text_id = torch.tensor([ids[c] for c in self.ret_captions])
        # image->text ranks the DISTINCT caption strings (identical captions have identical embeddings, so a
        # gallery with duplicates would fill the top 5 with copies of one string)
        self.uniq_captions = sorted(ids, key=ids.get)
        self.uniq_tokens = self.tokenizer(self.uniq_captions)
        first = {}
        for i, c in enumerate(self.ret_captions):
            first.setdefault(c, i)
        self.uniq_labels = self.ret_labels[torch.tensor([first[c] for c in self.uniq_captions])]


@torch.no_grad()
def _encode(model, images=None, tokens=None, device="cpu", bs=500):
    import torch.nn.functional as F
    out = []
    x = images if images is not None else tokens
    for i in range(0, len(x), bs):
        chunk = x[i:i + bs].to(device)
        e = model.encode_image(chunk) if images is not None else model.encode_text(chunk)
        out.append(F.normalize(e.float(), dim=-1).cpu())
    return torch.cat(out)


def _recall(sim: torch.Tensor, query_id: torch.Tensor, gallery_id: torch.Tensor, ks=(1, 5)) -> dict:
    top = sim.topk(max(ks), dim=1).indices  # [n, kmax]
    hit = gallery_id[top] == query_id[:, None]
    return {k: float(hit[:, :k].any(1).float().mean()) for k in ks}


@torch.no_grad()
def evaluate(model, ev: EvalSet, device: str) -> dict:
    """Zero-shot top-1 on the test split (template-averaged class embeddings) and retrieval recall@1/@5 on the
    retrieval subset. Retrieval hits: ``text`` = the retrieved caption's TEXT equals the paired caption text
    (captions are synthetic, one of 100 strings); ``class`` = the retrieved item names the same class."""
    img = _encode(model, images=ev.test_images, device=device)
    n_cls, n_t = len(ev.prompts), len(ev.prompts[0])
    cls = _encode(model, tokens=ev.prompt_tokens, device=device).view(n_cls, n_t, -1).mean(1)
    cls = torch.nn.functional.normalize(cls, dim=-1)
    acc = float(((img @ cls.T).argmax(1) == ev.test_labels).float().mean())
    ri = img[ev.ret_idx]
    rt = _encode(model, tokens=ev.ret_tokens, device=device)  # [n] captions of the retrieval pairs
    ru = _encode(model, tokens=ev.uniq_tokens, device=device)  # [u] distinct caption strings
    out = {"zero_shot": acc}
    uniq_ids = torch.arange(len(ev.uniq_captions))
    for kind, ids, uids in (("text", ev.ret_text_id, uniq_ids), ("class", ev.ret_labels, ev.uniq_labels)):
        i2t = _recall(ri @ ru.T, ids, uids)  # image -> distinct caption texts
        t2i = _recall(rt @ ri.T, ids, ids)  # caption -> images; hit if the image's own caption matches
        out[f"recall_{kind}"] = {"i2t_r1": i2t[1], "i2t_r5": i2t[5], "t2i_r1": t2i[1], "t2i_r5": t2i[5]}
    return out


@dataclass
class LossProbe:
    """Fixed tensors for the target loss: target pairs and the bank pairs (the prune job's bank selection)."""
    target_images: torch.Tensor
    target_tokens: torch.Tensor
    bank_images: torch.Tensor
    bank_tokens: torch.Tensor
    batch: int = 64


@torch.no_grad()
def target_losses(model, probe: LossProbe, device: str, per_sample: bool = False) -> dict:
    """``bank``: mean over the target set of pruner.model.loss.bank_loss against the fixed bank pairs, the bank
    embedded by the evaluated model itself (detached) and s = its exp(logit_scale): the loss whose gradient is
    v_target. ``in_batch``: the mean in-batch CLIP loss over fixed consecutive target batches of ``probe.batch``.
    ``per_sample``: also ``bank_per_sample``, each target pair's bank loss (a list)."""
    from pruner.model.loss import bank_loss, clip_batch_loss, logit_scale_of
    s = logit_scale_of(model)
    bi = _encode(model, images=probe.bank_images, device=device).double()
    bt = _encode(model, tokens=probe.bank_tokens, device=device).double()
    ti = _encode(model, images=probe.target_images, device=device).double()
    tt = _encode(model, tokens=probe.target_tokens, device=device).double()
    each = bank_loss(ti, tt, bi, bt, s)
    parts = [float(clip_batch_loss(ti[i:i + probe.batch], tt[i:i + probe.batch], s))
             for i in range(0, len(ti), probe.batch) if len(ti[i:i + probe.batch]) > 1]
    out = {"bank": float(each.mean()), "in_batch": float(np.mean(parts))}
    if per_sample:
        out["bank_per_sample"] = each.tolist()
    return out


# ---------------------------------------------------------------------------------------------------------------
# training runs (cached)
# ---------------------------------------------------------------------------------------------------------------
def last_checkpoint(run_dir: Path) -> str:
    doc = json.loads((run_dir / "trajectory.json").read_text())
    return str((run_dir / doc["checkpoints"][-1]["path"]).resolve())


def train_run(run_dir: Path, samples: Sequence[RawSample], *, arch: str, steps: int, batch_size: int, lr: float,
              seed: int, device: str, checkpoints: int = 1, log_every: int = 100, optimizer: str = "adamw",
              momentum: float = 0.9, pretrained: Optional[str] = None) -> Path:
    """Train the proxy architecture on ``samples`` with pruner's train_proxy (open_clip_train), from scratch or
    from ``pretrained`` (a checkpoint file or an open_clip tag); cached: a run directory holding trajectory.json is
    reused. Returns the run directory."""
    from pruner.train.proxy import train_proxy
    if (run_dir / "trajectory.json").exists():
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run
    shards = write_shards(samples, run_dir / "shards", "part")
    train_proxy([str(run_dir / "shards")], str(run_dir), arch=arch, steps=steps, batch_size=batch_size, lr=lr,
                checkpoints=checkpoints, pool_size=len(samples), seed=seed, device=device, log_every=log_every,
                optimizer=optimizer, momentum=momentum, pretrained=pretrained)
    for p in shards:
        Path(p).unlink()
    return run_dir


def drop_optimizer_state(run_dir: Path) -> None:
    """Shrink the run's checkpoints to weights only (the optimiser state is 2/3 of the bytes)."""
    for p in (run_dir / "train" / "checkpoints").glob("*.pt"):
        ck = torch.load(p, map_location="cpu", weights_only=True)
        if "optimizer" in ck:
            ck.pop("optimizer")
            torch.save(ck, p)


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
def _suspicion(score: np.ndarray) -> np.ndarray:
    s = -np.asarray(score, np.float64)
    if np.isnan(s).any():  # a NaN score is never kept: most suspicious
        s = np.where(np.isnan(s), np.nanmax(s) + 1.0, s)
    return s


def rank_order(score: np.ndarray, uids: Sequence[str]) -> np.ndarray:
    """Indices best first: score descending, uid ascending (pruner's ranking), NaN last."""
    s = np.asarray(score, np.float64)
    key = np.where(np.isnan(s), np.inf, -s)
    return np.lexsort((np.asarray(uids), key))


def detection(score: np.ndarray, swapped: np.ndarray, uids: Sequence[str], fractions=(0.1, 0.2, 0.3)) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score
    sus = _suspicion(score)
    order = rank_order(score, uids)[::-1]  # worst first
    found = {}
    for f in fractions:
        k = int(math.ceil(f * len(order)))
        found[str(f)] = float(swapped[order[:k]].sum() / max(swapped.sum(), 1))
    return {"auroc": float(roc_auc_score(swapped, sus)), "average_precision": float(average_precision_score(swapped, sus)),
            "found_at": found}


def pipeline_score(score: np.ndarray, filter_score: np.ndarray, uids, fraction: float,
                   niche_alpha: float | None = None) -> tuple[np.ndarray, dict | None]:
    """The default pipeline's order as one score (descending = the product's ranking, pruner.select.stages) and its
    niche test's record (None without ``niche_alpha``). The filter stage passes all but the lowest ``fraction`` by
    ``filter_score`` (ties by uid), the passing samples are ranked by ``score`` and the others follow by
    ``filter_score``. With ``niche_alpha``: the niche test (pruner.select.niche) of ``score`` over the passing
    samples decides; without a niche every sample is ranked by ``filter_score``."""
    staged = _filter_stage_score(score, filter_score, uids, fraction)
    if niche_alpha is None:
        return staged, None
    from pruner.select.niche import niche_test_values
    order = rank_order(filter_score, uids)
    passed = order[: len(score) - int(math.floor(fraction * len(score) + 1e-9))]
    test = niche_test_values(score[passed], "diffin_target", niche_alpha)
    return (staged if test.niche else np.asarray(filter_score, np.float64)), test.record()


def _filter_stage_score(score: np.ndarray, filter_score: np.ndarray, uids, fraction: float) -> np.ndarray:
    order = rank_order(filter_score, uids)  # best first
    passed = np.zeros(len(score), bool)
    passed[order[: len(score) - int(math.floor(fraction * len(score) + 1e-9))]] = True
    low = np.nanmin(score[passed]) if passed.any() else 0.0
    cut = np.nanmin(filter_score[passed]) if passed.any() else 0.0
    return np.where(passed, score, low - 1.0 - (cut - filter_score))


def group_standardized(score: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Scores z-normalised within each group (removes per-group offsets and scales)."""
    s = np.asarray(score, np.float64).copy()
    for g in np.unique(groups):
        m = groups == g
        sd = np.nanstd(s[m])
        s[m] = (s[m] - np.nanmean(s[m])) / (sd if sd > 0 else 1.0)
    return s


def balanced_keep(score: np.ndarray, uids: Sequence[str], groups: np.ndarray, frac: float) -> np.ndarray:
    """Top-``frac`` of every group by score (group quotas proportional to group size, largest remainders)."""
    n_keep = int(math.floor(frac * len(score) + 1e-9))
    gs = np.unique(groups)
    raw = np.array([frac * (groups == g).sum() for g in gs])
    q = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - q))[: n_keep - q.sum()]:
        q[i] += 1
    out = []
    uids = np.asarray(uids)
    for g, k in zip(gs, q):
        idx = np.nonzero(groups == g)[0]
        out.append(idx[rank_order(score[idx], uids[idx])[:k]])
    return np.sort(np.concatenate(out))


def auroc_by_group(score: np.ndarray, swapped: np.ndarray, groups: np.ndarray, names: dict) -> dict:
    from sklearn.metrics import roc_auc_score
    out = {}
    for g, name in names.items():
        m = groups == g
        if m.any() and 0 < swapped[m].sum() < m.sum():
            out[name] = float(roc_auc_score(swapped[m], _suspicion(score[m])))
    return out


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else float("nan")


def pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------------------------------------------------------
# Diff-In parameter-space update for a dropped set (data deletion)
# ---------------------------------------------------------------------------------------------------------------
def _summed_gradient(engine, batches, shared) -> dict:
    """grad_theta sum_{z in D} l_z(theta) with the frozen bank of the checkpoint (the scored per-sample loss)."""
    from pruner.model.loss import bank_loss, encode_pairs
    params, dev = engine.params(), engine.device
    names = list(params)
    total = None
    for images, tokens in batches:
        img, txt = encode_pairs(engine.model, images.to(dev), tokens.to(dev))
        loss = bank_loss(img, txt, shared.bank_img, shared.bank_txt, shared.scale).sum()
        gs = torch.autograd.grad(loss, [params[n] for n in names])
        total = {n: g.detach() for n, g in zip(names, gs)} if total is None else \
            {n: total[n] + g.detach() for n, g in zip(names, gs)}
    return total


def diffin_parameter_update(traj, arch: str, shared_states: Sequence, a_ts: Sequence[float], dropped_batches,
                            reference_batches, hvp_eps: float, fd_eps: float, device: str,
                            include=("*",), exclude=()) -> tuple[dict, dict]:
    """U = sum_t a_t (H_B g_D + D_G g_D), g_D = sum_{z in D} g_z, the sum over D of Diff-In's parameter influence
    I_theta(z) (removal convention: theta_T + U approximates training without D). H_B g_D: central differences of
    the reference-batch gradient along g_D (pruner.scores.shared.reference_hvp); sum_z H_z G_B = D_G g_D: central
    differences of g_D at theta_t +- fd_eps * G^. Plain autograd on the linearised model; the update covers the
    scored parameters (every nn.Linear weight and bias). Returns (U, diagnostics)."""
    from pruner.grads.engine import PerSampleGradients
    from pruner.grads.vectors import norm, perturbed
    from pruner.scores.shared import reference_hvp
    total, diag = None, []
    for ck, st, a_t in zip(traj.checkpoints, shared_states, a_ts):
        model = load_model(ck.path, arch, device)
        engine = PerSampleGradients(model, k=8, layer_k=2, include=include, exclude=exclude)
        params = engine.params()
        gd = _summed_gradient(engine, dropped_batches, st)
        hb = reference_hvp(engine, reference_batches, st.scale, gd, hvp_eps)
        G = st.vectors["G"]
        with perturbed(params, G, fd_eps):
            gp = _summed_gradient(engine, dropped_batches, st)
        with perturbed(params, G, -fd_eps):
            gm = _summed_gradient(engine, dropped_batches, st)
        gn = norm(G)
        dg = {n: (gp[n] - gm[n]) * (gn / (2 * fd_eps)) for n in gp}
        term = {n: a_t * (hb[n] + dg[n]) for n in hb}
        total = term if total is None else {n: total[n] + term[n] for n in total}
        diag.append({"step": ck.step, "a_t": a_t, "norm_g_D": norm(gd), "norm_HB_gD": norm(hb),
                     "norm_DG_gD": norm(dg), "norm_term": norm(term)})
        del model, engine
    return total, {"per_checkpoint": diag, "norm_update": norm(total)}


def apply_update(model, engine_params: dict, update: dict, scale: float = 1.0) -> None:
    with torch.no_grad():
        for n, u in update.items():
            engine_params[n].add_(u.to(engine_params[n].device), alpha=scale)


# ---------------------------------------------------------------------------------------------------------------
# aggregation over seeds
# ---------------------------------------------------------------------------------------------------------------
def aggregate(values: list):
    """Mean and (sample) std of a list of equally shaped nested dicts of numbers; (mean, std) trees."""
    first = values[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(v, dict) and k in v for v in values)]
        pairs = {k: aggregate([v[k] for v in values]) for k in keys}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        arr = np.array([float(v) for v in values])
        arr = arr[np.isfinite(arr)]
        if not len(arr):
            return float("nan"), float("nan")
        return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return first, None


def write_json(path: Path, obj) -> None:
    write_json_atomic(path, obj)
