"""Per-checkpoint quantities shared by every sample (computed once per checkpoint by one worker).

Notation (shared/methods.md §1): theta_t the checkpoint, V the target set, B the reference batches.

* ``v_target = grad L(V; theta_t)``: mean per-sample bank loss over the target set.
* ``v_pred = -grad mean_V s<x, y>``: the prediction-score target (TracIn's label-free variant): the gradient of
  the target pairs' image-text similarity, negated so that "positive = helpful" holds as for the loss.
* ``G = G_B``: gradient of the true in-batch CLIP loss, averaged over R fixed, hash-selected reference
  batches (the stochastic proxy of the training gradient; also the training-loss target of coreset selection).
* ``u_X = H_B v_X`` for each target direction, by central finite differences of the reference-batch gradient:
  ``H_B v ~ [G_B(theta + h v^) - G_B(theta - h v^)] ||v|| / (2h)`` (2 batch gradients per direction, once per
  checkpoint; O(h^2) truncation). By symmetry of H_B, T1 = <v, H_B g_z> = <u, g_z> needs no per-sample HVP.
* ``eig``: top-r eigenpairs of H_B (subspace iteration on the same finite-difference HVP) for the
  self-influence term g^T H_B g ~ sum_k lambda_k <q_k, g>^2, the only term with a per-sample direction.
* Diff-In's ``propagated`` form (pruner.scores.propagation) instead needs, in the k-dim sketch: the sketched
  Gauss-Newton matrix K_t of a hash-picked subsample of the pool (``curvature``), the projected target and training
  gradients P v_target, P G (``projected``), and the optimiser's step scale of the checkpoint (``step_scale``: read
  from its optimiser state, else estimated from minibatch gradients, :func:`estimated_step_scale`); no
  Hessian-vector product at all.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from pruner.grads.engine import PerSampleGradients
from pruner.grads.vectors import ParamVector, norm, perturbed
from pruner.model.checkpoints import energy_weighted_step_scale
from pruner.model.loss import bank_loss, clip_batch_loss, encode_pairs, logit_scale_of
from pruner.scores.propagation import Curvature, curvature
from pruner.scores.step_scales import step_scale_of

Batch = tuple[torch.Tensor, torch.Tensor]  # (images [B,3,H,W], tokens [B,ctx])


@dataclass
class CheckpointShared:
    """Everything a worker needs at checkpoint i besides the weights. Tensors only (weights_only-loadable)."""

    index: int
    step: int
    eta: float  # TracIn's weight of the checkpoint: the LR summed over the updates it stands for
    a_t: float  # Diff-In coefficient -t * eta_t^2 * Delta_t / N (pruner.scorer.checkpoint_weights)
    scale: float  # exp(logit_scale)
    bank_img: torch.Tensor  # [K, e]
    bank_txt: torch.Tensor  # [K, e]
    bank_uids: tuple[str, ...] = ()  # [K]: whose pair each bank row is (a member's own row is masked in its loss);
    # () for an anonymous bank that holds none of the scored pairs
    vectors: dict[str, ParamVector] = field(default_factory=dict)  # v_target, v_pred, G, u_target, u_train, q0..
    eigvals: list[float] = field(default_factory=list)
    # Diff-In's propagated form: K_t in the sketch, {"target": P v_target, "train": P G} [k], the optimiser's step scale
    curvature: Optional[Curvature] = None
    projected: dict[str, torch.Tensor] = field(default_factory=dict)
    step_scale: float = 1.0
    # "optimizer" (its state, over the sketched layers), "optimizer_all_parameters" (its state, which could not be
    # matched to parameter names), "estimated" (estimated_step_scale); "legacy" for a state an older pruner wrote
    # (its Adam scale averaged every parameter, and a checkpoint without optimiser state got 1)
    step_scale_source: str = "optimizer"

    def to_state(self) -> dict:
        """Plain tensors and values (``torch.load(..., weights_only=True)`` reads them back), every tensor on the CPU
        in a compact storage of its own (:func:`owned`): the per-layer tensors of a vector are often views of one flat
        buffer (the eigenvectors), and both torch.save of a deserialised copy and Ray's serialisation would otherwise
        carry the whole buffer once per view (28x the bytes for pruner-tiny's layers)."""
        return {"index": self.index, "step": self.step, "eta": self.eta, "a_t": self.a_t, "scale": self.scale,
                "bank_img": owned(self.bank_img), "bank_txt": owned(self.bank_txt), "bank_uids": list(self.bank_uids),
                "vectors": {k: {n: owned(t) for n, t in v.items()} for k, v in self.vectors.items()},
                "eigvals": list(self.eigvals), "step_scale": self.step_scale,
                "step_scale_source": self.step_scale_source,
                "projected": {k: owned(t) for k, t in self.projected.items()},
                **({} if self.curvature is None else {"curvature_vals": owned(self.curvature.eigvals),
                                                      "curvature_vecs": owned(self.curvature.eigvecs)})}

    @classmethod
    def load(cls, path, device="cpu") -> "CheckpointShared":
        """The shared quantities :func:`save_state` wrote to ``path``."""
        return cls.from_state(load_state(path), device)

    @classmethod
    def from_state(cls, s: dict, device="cpu") -> "CheckpointShared":
        if "bank_uids" not in s:
            raise ValueError("shared quantities written by an older pruner (no bank uids, so a bank member's own pair "
                             "stayed among its negatives) (fix: run the job again in a new output_dir)")
        step_scale, step_scale_source = step_scale_of(s)
        return cls(index=int(s["index"]), step=int(s["step"]), eta=float(s["eta"]), a_t=float(s["a_t"]),
                   scale=float(s["scale"]), bank_img=s["bank_img"].to(device), bank_txt=s["bank_txt"].to(device),
                   bank_uids=tuple(s["bank_uids"]),
                   vectors={k: {n: t.to(device) for n, t in v.items()} for k, v in s["vectors"].items()},
                   eigvals=[float(x) for x in s["eigvals"]], step_scale=step_scale,
                   step_scale_source=step_scale_source,
                   projected={k: t.to(device) for k, t in s.get("projected", {}).items()},
                   curvature=Curvature(s["curvature_vals"].to(device), s["curvature_vecs"].to(device))
                   if "curvature_vals" in s else None)

    @functools.cached_property
    def _bank_row(self) -> dict[str, int]:
        return {u: j for j, u in enumerate(self.bank_uids)}

    def own_rows(self, uids: Sequence[str]) -> torch.Tensor:
        """[B] int64: each uid's bank row, -1 for a pair that is not a bank member (``bank_loss``'s ``own``)."""
        return torch.tensor([self._bank_row.get(u, -1) for u in uids], dtype=torch.int64)


def save_state(state: dict, path) -> None:
    """Write a :meth:`CheckpointShared.to_state` dict to ``path`` (a job's ``shared/ckpt-<i>.pt``) atomically."""
    from pruner.io.atomic import atomic_path
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path, mmap: bool = False) -> dict:
    """The state :func:`save_state` wrote, read without executing code (``weights_only``) onto the CPU; ``mmap``
    leaves the tensors in the file until they are touched."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, detached, in a contiguous storage holding exactly its own elements (copied only when it is a
    view into a larger buffer or strided)."""
    t = t.detach().cpu()
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def embed_bank(model, batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm embeddings of the bank pairs, [K, e] each (float32, detached)."""
    dev = next(model.parameters()).device
    imgs, txts = zip(*[encode_pairs(model, i.to(dev), t.to(dev)) for i, t in batches])
    return torch.cat(imgs).float(), torch.cat(txts).float()


def _grad(params: dict[str, torch.nn.Parameter], loss: torch.Tensor, retain_graph: bool = False) -> ParamVector:
    names = list(params)
    gs = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=retain_graph)
    return {n: g.detach() for n, g in zip(names, gs)}


def _accumulate(total: Optional[ParamVector], g: ParamVector, w: float) -> ParamVector:
    return {n: t * w for n, t in g.items()} if total is None else {n: total[n] + g[n] * w for n in total}


def weighted_gradient(engine: PerSampleGradients, batches: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[str]]],
                      shared: "CheckpointShared", weights: Optional[Sequence[torch.Tensor]] = None) -> ParamVector:
    """sum_i w_i g_i over the pairs of ``batches`` ((images, tokens, uids) each), g_i the gradient of pair i's bank
    loss (its own bank row masked), by one backward per batch; ``weights``: [B] per batch (default all 1)."""
    params, dev = engine.params(), engine.device
    total = None
    for j, (images, tokens, uids) in enumerate(batches):
        img, txt = encode_pairs(engine.model, images.to(dev), tokens.to(dev))
        loss = bank_loss(img, txt, shared.bank_img, shared.bank_txt, shared.scale, shared.own_rows(uids))
        w = 1.0 if weights is None else weights[j].to(loss)
        total = _accumulate(total, _grad(params, (loss * w).sum()), 1.0)
    return total


def target_gradients(engine: PerSampleGradients, batches: list[Batch], bank: tuple[torch.Tensor, torch.Tensor],
                     scale: float, own: Optional[list[torch.Tensor]] = None) -> tuple[ParamVector, ParamVector]:
    """(v_target, v_pred) over the target batches: gradients of the mean bank loss and of minus the mean
    pair similarity s<x,y>. ``own``: per batch, the bank rows of its pairs ([B] int64, -1 for none; a target
    drawn from the pool may hold bank members)."""
    params, dev = engine.params(), engine.device
    n = sum(b[0].shape[0] for b in batches)
    v = vp = None
    for j, (images, tokens) in enumerate(batches):
        img, txt = encode_pairs(engine.model, images.to(dev), tokens.to(dev))
        loss = bank_loss(img, txt, bank[0], bank[1], scale, None if own is None else own[j]).sum() / n
        sim = -(scale * (img.double() * txt.double()).sum(-1)).sum() / n
        v = _accumulate(v, _grad(params, loss, retain_graph=True), 1.0)
        vp = _accumulate(vp, _grad(params, sim), 1.0)
    return v, vp


def reference_gradient(engine: PerSampleGradients, batches: list[Batch], scale: float) -> ParamVector:
    """G_B: the in-batch CLIP loss gradient averaged over the reference batches."""
    params, dev = engine.params(), engine.device
    g = None
    for images, tokens in batches:
        img, txt = encode_pairs(engine.model, images.to(dev), tokens.to(dev))
        g = _accumulate(g, _grad(params, clip_batch_loss(img, txt, scale)), 1.0 / len(batches))
    return g


def reference_hvp(engine: PerSampleGradients, batches: list[Batch], scale: float, vec: ParamVector,
                  h: float) -> ParamVector:
    """H_B vec by central differences of G_B at theta +- h * vec/||vec|| (exact up to O(h^2))."""
    params, nv = engine.params(), norm(vec)
    with perturbed(params, vec, h):
        gp = reference_gradient(engine, batches, scale)
    with perturbed(params, vec, -h):
        gm = reference_gradient(engine, batches, scale)
    return {n: (gp[n] - gm[n]) * (nv / (2 * h)) for n in gp}


def top_eigenpairs(engine: PerSampleGradients, batches: list[Batch], scale: float, rank: int, h: float,
                   iters: int = 4, seed: int = 0) -> tuple[list[float], list[ParamVector]]:
    """Top-|lambda| eigenpairs of H_B by subspace iteration + Rayleigh-Ritz on finite-difference HVPs.

    Costs rank * (iters + 1) HVPs (2 reference gradients each), once per checkpoint."""
    params = engine.params()
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]
    dev = engine.device

    def unflat(x: torch.Tensor) -> ParamVector:
        return {n: c.view(s) for n, c, s in zip(names, x.split(sizes), shapes)}

    def flat(v: ParamVector) -> torch.Tensor:
        return torch.cat([v[n].reshape(-1) for n in names]).double()

    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(sum(sizes), rank, generator=g, dtype=torch.float64))[0].to(dev)
    for _ in range(iters):
        hq = torch.stack([flat(reference_hvp(engine, batches, scale, unflat(q[:, j].float()), h))
                          for j in range(rank)], 1)
        q = torch.linalg.qr(hq)[0]
    hq = torch.stack([flat(reference_hvp(engine, batches, scale, unflat(q[:, j].float()), h)) for j in range(rank)], 1)
    t = q.T @ hq
    evals, evecs = torch.linalg.eigh(0.5 * (t + t.T))
    vecs = q @ evecs
    return [float(x) for x in evals], [unflat(vecs[:, j].float()) for j in range(rank)]


def estimated_step_scale(engine: PerSampleGradients, batches: Sequence[Batch], scale: float, train_batch_size: int,
                         eps: float = 1e-8) -> float:
    """Adam(W)'s step scale (pruner.model.checkpoints.energy_weighted_step_scale) for a checkpoint saved without its
    optimiser state, from the second moments its training gradients would have at this checkpoint.

    Adam's v_p is the running mean of the squared minibatch gradient, E[g_p^2] = mu_p^2 + sigma_p^2 / B for batch
    size B, with mu the full-batch gradient and sigma^2 the per-pair variance. From the in-batch CLIP loss gradients
    g_1..g_m of ``batches`` (m minibatches of b pairs each; the partial last one is left out when there are two full
    ones) with mean g_bar and mean square q: S_p = m / (m - 1) (q_p - g_bar_p^2) estimates sigma_p^2 / b,
    mu_p^2 = max(g_bar_p^2 - S_p / m, 0), and v_p = mu_p^2 + S_p b / ``train_batch_size``. With one minibatch,
    v_p = g_p^2 (its own batch size). Why an estimate serves: the propagated form's selections move little for
    step scales within a few times the optimiser's, while the LR alone (a scale of 1) is orders of magnitude too
    small on AdamW-trained models and ranks like TracIn (benchmarks/RESULTS.md, "Checkpoints without optimiser
    state"). Approximations, which make the estimate run high: Adam's v also averages the larger gradients of the
    steps before the checkpoint, and training augments its images; the in-batch loss is taken at b pairs, not
    ``train_batch_size``. Over the engine's layers (the sketched ones), as the optimiser state's scale is
    (pruner.model.checkpoints.optimizer_step_scale). Costs one backward per batch. Accumulates in float32 on the
    engine's device (2 x the parameters of the engine's layers)."""
    params, dev = engine.params(), engine.device
    sizes = [int(images.shape[0]) for images, _ in batches]
    if not sizes:
        raise ValueError("estimating the step scale needs at least one batch of pool pairs")
    common = max(set(sizes), key=lambda n: (sizes.count(n), n))  # the full batches' size
    use = [x for x, n in zip(batches, sizes) if n == common] if sizes.count(common) >= 2 else [batches[0]]
    b, m = int(use[0][0].shape[0]), len(use)
    mean = sq = None
    for images, tokens in use:
        img, txt = encode_pairs(engine.model, images.to(dev), tokens.to(dev))
        loss = clip_batch_loss(img, txt, scale)
        g = {n: t.float() for n, t in _grad(params, loss).items()}
        mean = _accumulate(mean, g, 1.0 / m)
        sq = _accumulate(sq, {n: t.square() for n, t in g.items()}, 1.0 / m)
    if m == 1:
        return energy_weighted_step_scale(list(sq.values()), eps)
    moments = []
    for n in mean:
        spread = (sq[n] - mean[n].square()).clamp_min(0) * (m / (m - 1))
        mu2 = (mean[n].square() - spread / m).clamp_min(0)
        moments.append(mu2 + spread * (b / train_batch_size))
    return energy_weighted_step_scale(moments, eps)


def sketched_curvature(engine: PerSampleGradients, batches: list[Batch], bank: tuple[torch.Tensor, torch.Tensor],
                       scale: float, own: list[torch.Tensor], rank: int) -> Curvature:
    """K_t = (1/n) sum_i P g_i P g_i^T over the per-sample bank-loss gradients of ``batches`` (a hash-picked subsample
    of the pool), as its top ``rank`` eigenpairs (pruner.scores.propagation.curvature). ``own``: per batch, the bank
    rows of its pairs."""
    feats = [engine.run(i, t, lambda a, b, o=o: bank_loss(a, b, bank[0], bank[1], scale, o), features=True,
                        norms=False).features for (i, t), o in zip(batches, own)]
    c = curvature(torch.cat(feats), rank=rank)
    return Curvature(c.eigvals.float(), c.eigvecs.float())


def compute_shared(engine: PerSampleGradients, *, index: int, step: int, eta: float, a_t: float,
                   bank_batches: list[Batch], target_batches: list[Batch], reference_batches: list[Batch],
                   targets: Iterable[str], hvp_eps: float, self_rank: int, seed: int = 0,
                   bank_uids: Sequence[str] = (), target_uids: Optional[Sequence[str]] = None,
                   form: str = "exact_increment", curvature_batches: Sequence[Batch] = (),
                   curvature_uids: Sequence[Sequence[str]] = (), curvature_rank: int = 512,
                   step_scale: Optional[float] = 1.0, train_batch_size: int = 256,
                   step_scale_source: str = "optimizer") -> CheckpointShared:
    """All shared quantities of one checkpoint. ``targets`` is a subset of {"target", "self", "train"}; the
    target gradients are computed whenever target batches are given (TracIn uses them too). ``bank_uids`` and
    ``target_uids``: the uids of the bank and target pairs in batch order (defaults: an anonymous bank).
    ``form`` ``propagated`` (Diff-In's, pruner.scores.propagation) computes no Hessian-vector product: the sketched
    curvature of ``curvature_batches`` (uids per batch: ``curvature_uids``), the projected target and training
    gradients and ``step_scale`` instead (None: the checkpoint has no optimiser state, so it is estimated from the
    curvature batches at ``train_batch_size``, :func:`estimated_step_scale`); the other forms compute u_X = H_B v_X
    and, for "self", eigenpairs of H_B."""
    targets = set(targets)
    scale = logit_scale_of(engine.model)
    bank = embed_bank(engine.model, bank_batches)
    shared = CheckpointShared(index=index, step=step, eta=eta, a_t=a_t, scale=scale, bank_img=bank[0],
                              bank_txt=bank[1], bank_uids=tuple(bank_uids), step_scale=1.0 if step_scale is None
                              else step_scale, step_scale_source=step_scale_source)
    vec = shared.vectors
    vec["G"] = reference_gradient(engine, reference_batches, scale)
    if target_batches:
        own = None if target_uids is None else \
            list(shared.own_rows(target_uids).split([b[0].shape[0] for b in target_batches]))
        vec["v_target"], vec["v_pred"] = target_gradients(engine, target_batches, bank, scale, own)
    if form == "propagated":
        if targets:
            own = [shared.own_rows(u) for u in curvature_uids] if curvature_uids else [None] * len(curvature_batches)
            shared.curvature = sketched_curvature(engine, list(curvature_batches), bank, scale, own, curvature_rank)
            if step_scale is None:
                shared.step_scale = estimated_step_scale(engine, list(curvature_batches), scale, train_batch_size)
                shared.step_scale_source = "estimated"
            proj = engine.projector
            shared.projected = {"train": proj.project_weights(vec["G"]).float()}
            if "v_target" in vec:
                shared.projected["target"] = proj.project_weights(vec["v_target"]).float()
        return shared
    if "target" in targets:
        vec["u_target"] = reference_hvp(engine, reference_batches, scale, vec["v_target"], hvp_eps)
    if "train" in targets:
        vec["u_train"] = reference_hvp(engine, reference_batches, scale, vec["G"], hvp_eps)
    if "self" in targets:
        shared.eigvals, qs = top_eigenpairs(engine, reference_batches, scale, self_rank, hvp_eps, seed=seed)
        for j, qj in enumerate(qs):
            vec[f"q{j}"] = qj
    return shared
