"""Per-sample gradients of linear layers from forward/backward hooks, in one pass at training-step cost.

For a linear layer y = W a (+ b) applied to tokens t = 1..T of sample z, the per-sample gradient is
``dW_z = sum_t gy_{z,t} a_{z,t}^T`` ([d_out, d_in]). From the captured layer input ``a`` [B, T, d_in] and output
gradient ``gy`` [B, T, d_out] the engine computes, per sample:

* projected features: ``sum_t (P_out gy_t)(P_in a_t)^T`` per layer, concatenated, then reduced to k dims
  (see :mod:`pruner.grads.project`); dW_z is not formed for these;
* the exact squared gradient norm ``||dW_z||^2`` (plus bias) and exact inner products ``<dW_z, D_j>`` with fixed
  directions (e.g. a target gradient): dW_z is formed a bounded chunk of samples at a time and contracted with
  every direction in one GEMM (:func:`weight_gradient_terms`), which costs about one forward of the layer in
  all, however many directions there are.

Model parameters are switched to ``requires_grad=False`` during the pass and only the patch / token embedding
outputs require grad, so backward computes activation gradients only: no batch weight gradient is formed.
Layer selection: every ``nn.Linear`` of a model passed through :func:`pruner.model.clip.linearize_clip`
(attention in/out projections, MLPs, both tower output projections), filtered by fnmatch name patterns.
Embeddings, norms, the patch convolution and logit_scale are not linear layers and are never selected.
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from pruner.grads.project import FactorizedProjector
from pruner.grads.vectors import ParamVector
from pruner.model.clip import linear_layers
from pruner.model.loss import encode_pairs

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (img [B,e], txt [B,e]) -> per-sample loss [B]


@dataclass
class PerSampleResult:
    """Outputs for a batch of B samples (all detached)."""

    loss: torch.Tensor  # [B] float64, the per-sample loss
    features: Optional[torch.Tensor]  # [B, k] float32 projected gradients ([B, concat_dim] stage-1 sketch if not reduced)
    sq_norm: Optional[torch.Tensor]  # [B] float64 exact squared L2 norm of the gradient over selected params
    dots: Optional[torch.Tensor]  # [B, n_directions] float64 exact <g_z, d_j>
    img_emb: torch.Tensor  # [B, e] float32 unit-norm
    txt_emb: torch.Tensor  # [B, e] float32 unit-norm


class Directions:
    """A fixed set of n parameter-space directions, stacked per layer once (weights flattened [n, d_out * d_in],
    biases [n, d_out]) so the hooks can contract with all of them in one matmul."""

    def __init__(self, engine: "PerSampleGradients", vectors: Sequence[ParamVector]):
        self.n = len(vectors)
        self.flat_weight: dict[str, torch.Tensor] = {}  # [n, d_out * d_in]
        self.bias: dict[str, torch.Tensor] = {}
        for name, layer in engine.layers.items():
            dev = layer.weight.device
            self.flat_weight[name] = torch.stack([v[f"{name}.weight"].flatten() for v in vectors]).float().to(dev)
            if layer.bias is not None:
                self.bias[name] = torch.stack([v[f"{name}.bias"] for v in vectors]).float().to(dev)


def drop_trailing_zero_tokens(a: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the token positions after the last one with a non-zero output gradient in any sample (views of a
    [B, T, d_in] and gy [B, T, d_out]). Exact: a zero gy_t adds nothing to any per-sample quantity. The layers
    of a tower's last block after attention see a non-zero gradient at the pooled token only: in the vision tower
    that is the class token, position 0, so their hook work shrinks to one token. (The text padding after the last
    end-of-text token is not even computed: :func:`pruner.model.clip.encode_text`; for a text tower that runs the
    full context, those positions have exactly zero gradient and are cut here.)"""
    if bool(gy[:, -1].any()):  # the common case (every vision token is live): no scan of the whole gradient
        return a, gy
    live = (gy.amax((0, 2)) > 0) | (gy.amin((0, 2)) < 0)  # [T]; ~10x faster than gy.abs().amax: no |gy| copy
    used = torch.nonzero(live).flatten()
    t = int(used[-1]) + 1 if len(used) else 1
    return (a, gy) if t == gy.shape[1] else (a[:, :t], gy[:, :t])


def weight_gradient_terms(a: torch.Tensor, gy: torch.Tensor, directions: Optional[torch.Tensor] = None,
                          norms: bool = True, chunk_bytes: int = 64 << 20
                          ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Exact squared norms and directional dots of the per-sample weight gradients dW_z = sum_t gy_t a_t^T.

    a [B, T, d_in], gy [B, T, d_out] (float32); ``directions`` [n, d_out * d_in] (flattened weights) or None.
    Returns (||dW_z||^2 [B] float64 or None without ``norms``, <dW_z, D_j> [B, n] float64 or None).

    Single-token layers (T = 1) use the rank-1 closed forms. Norms alone use the Gram trick
    ||dW_z||^2 = sum_{t,s} <gy_t, gy_s><a_t, a_s> (B T^2 (d_in + d_out) multiply-adds) when that is cheaper than
    forming dW_z. Otherwise dW_z is formed for a chunk of samples at a time (at most ``chunk_bytes``, so memory
    stays bounded for wide layers) and contracted with all n directions in one GEMM: B T d_out d_in +
    B (n + 1) d_out d_in multiply-adds, i.e. about one forward of the layer whatever n, against n forwards
    (B T n d_out d_in) for contracting token by token with each direction.
    """
    b, t, d_in = a.shape
    d_out = gy.shape[-1]
    if t == 1:
        a1, g1 = a[:, 0], gy[:, 0]
        sq = (g1.square().sum(1) * a1.square().sum(1)).double() if norms else None
        dots = None
        if directions is not None:  # <g a^T, D> = g^T D a
            z = (a1 @ directions.view(-1, d_out, d_in).transpose(1, 2)).transpose(0, 1)  # [B, n, d_out]
            dots = (z * g1[:, None]).sum(-1).double()
        return sq, dots
    if directions is None:
        if not norms:
            return None, None
        if t * (d_in + d_out) < d_in * d_out:
            return ((gy @ gy.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2)).double(), None
    sq = torch.empty(b, dtype=torch.float64, device=a.device) if norms else None
    dots = None if directions is None else torch.empty(b, directions.shape[0], dtype=torch.float64, device=a.device)
    step = max(1, chunk_bytes // (4 * d_out * d_in))
    for s in range(0, b, step):
        dw = torch.bmm(gy[s:s + step].transpose(1, 2), a[s:s + step]).flatten(1)  # [c, d_out * d_in]
        if sq is not None:
            sq[s:s + step] = torch.linalg.vector_norm(dw, dim=1).double().square()
        if dots is not None:
            dots[s:s + step] = (dw @ directions.T).double()
    return sq, dots


def select_layers(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> dict[str, nn.Linear]:
    """Linear layers whose names match an include pattern and no exclude pattern (fnmatch)."""
    chosen = {n: m for n, m in linear_layers(model).items()
              if any(fnmatch.fnmatchcase(n, p) for p in include) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    if not chosen:
        raise ValueError(f"no linear layer matches features.include={list(include)} / exclude={list(exclude)}")
    return chosen


class PerSampleGradients:
    """The gradient computer: per-sample projected gradients, exact norms and exact directional dots.

    ``model`` must be linearised (``linearize_clip``). ``precision`` selects autocast for the forward/backward
    ("bf16"/"fp16"); projections and accumulations always run in float32 (dots and norms in float64).
    """

    def __init__(self, model: nn.Module, k: int = 1024, layer_k: int = 16, seed: int = 0,
                 kind: str = "rademacher", include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                 precision: str = "fp32", single_token_k: Optional[int] = None,
                 single_token_layers: Optional[Sequence[str]] = None, single_token_direct: bool = True):
        self.model = model
        self.layers = select_layers(model, include, exclude)
        device = next(model.parameters()).device
        self.device = device
        self.precision = precision
        self.projector = FactorizedProjector(
            {n: (m.out_features, m.in_features, m.bias is not None) for n, m in self.layers.items()},
            k=k, layer_k=layer_k, seed=seed, kind=kind, device=device, single_token_k=single_token_k,
            single_token_layers=single_token_layers, single_token_direct=single_token_direct)

    # -- parameters ---------------------------------------------------------------------------------------
    def params(self) -> dict[str, nn.Parameter]:
        """The selected parameters by qualified name (``<layer>.weight``, ``<layer>.bias``)."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.weight"] = layer.weight
            if layer.bias is not None:
                out[f"{name}.bias"] = layer.bias
        return out

    def directions(self, vectors: Sequence[ParamVector]) -> Directions:
        return Directions(self, vectors)

    # -- the pass -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _activation_grads_only(self):
        """Freeze every parameter; make the embedding outputs the autograd leaves instead."""
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        leaves: list[torch.Tensor] = []

        def make_leaf(_m, _i, out):
            out = out.detach().requires_grad_(True)
            leaves.append(out)
            return out

        handles = [self.model.visual.conv1.register_forward_hook(make_leaf),
                   self.model.token_embedding.register_forward_hook(make_leaf)]
        try:
            for p, _ in saved:
                p.requires_grad_(False)
            yield leaves
        finally:
            for h in handles:
                h.remove()
            for p, rg in saved:
                p.requires_grad_(rg)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def run(self, images: torch.Tensor, tokens: torch.Tensor, loss_fn: LossFn,
            directions: Optional[Directions] = None, features: bool = True, norms: bool = True,
            reduce: bool = True) -> PerSampleResult:
        """One forward + activation-only backward over a batch.

        images: [B, 3, H, W] preprocessed; tokens: [B, context] token ids. ``loss_fn`` maps the unit-norm
        embeddings to per-sample losses [B]; it must not mix samples (use a detached bank).
        ``reduce=False`` leaves ``features`` as the stage-1 concatenation [B, concat_dim]: callers that combine
        several passes linearly (the finite differences) reduce the combination once with
        :meth:`FactorizedProjector.reduce`.
        """
        b = images.shape[0]
        proj = self.projector
        concat = torch.zeros(b, proj.concat_dim, device=self.device) if features else None
        sq = torch.zeros(b, dtype=torch.float64, device=self.device) if norms else None
        dots = torch.zeros(b, directions.n, dtype=torch.float64, device=self.device) if directions else None

        def on_grad(name: str, a: torch.Tensor, gy: torch.Tensor) -> None:
            a = a.reshape(b, -1, a.shape[-1]).float()  # [B, T, d_in]
            gy = gy.reshape(b, -1, gy.shape[-1]).float()  # [B, T, d_out]
            if gy.device.type == "cpu":  # it reads the gradient on the host: a sync per layer on CUDA
                a, gy = drop_trailing_zero_tokens(a, gy)
            has_bias = self.layers[name].bias is not None
            gsum = gy.sum(1) if has_bias else None  # [B, d_out] bias gradient
            if concat is not None:
                proj.add_block(concat, name, proj.project_activations(name, a, gy))
            if sq is not None or dots is not None:
                w2, wd = weight_gradient_terms(a, gy, None if dots is None else directions.flat_weight[name],
                                               norms=sq is not None)
                if sq is not None:
                    sq.add_(w2)
                    if has_bias:
                        sq.add_(gsum.square().sum(1).double())
                if dots is not None:
                    dots.add_(wd)
                    if has_bias:
                        dots.add_((gsum @ directions.bias[name].T).double())

        def fwd_hook(name):
            def hook(_m, inputs, out):
                if out.requires_grad:
                    a = inputs[0].detach()
                    out.register_hook(lambda gy: on_grad(name, a, gy))
            return hook

        handles = [layer.register_forward_hook(fwd_hook(n)) for n, layer in self.layers.items()]
        try:
            with self._activation_grads_only() as leaves, self._autocast():
                img, txt = encode_pairs(self.model, images.to(self.device), tokens.to(self.device))
                loss = loss_fn(img, txt)
                torch.autograd.grad(loss.sum(), leaves)
        finally:
            for h in handles:
                h.remove()
        feats = proj.reduce(concat) if concat is not None and reduce else concat
        return PerSampleResult(loss=loss.detach(), features=feats, sq_norm=sq, dots=dots,
                               img_emb=img.detach().float(), txt_emb=txt.detach().float())
