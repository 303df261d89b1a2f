"""Per-sample gradients of linear layers from forward/backward hooks, in one pass at training-step cost.

For a linear layer y = W a (+ b) applied to tokens t = 1..T of sample z, the per-sample gradient is
``dW_z = sum_t gy_{z,t} a_{z,t}^T`` ([d_out, d_in]); it is never materialised. From the captured layer input
``a`` [B, T, d_in] and output gradient ``gy`` [B, T, d_out] the engine computes, per sample:

* projected features: ``sum_t (P_out gy_t)(P_in a_t)^T`` per layer, concatenated, then reduced to k dims
  (see :mod:`pruner.grads.project`);
* the exact squared gradient norm: ``||dW_z||^2 = sum_{t,s} <gy_t, gy_s><a_t, a_s>`` (Gram trick), plus bias;
* exact inner products with fixed directions d (e.g. a target gradient): ``<dW_z, D> = sum_t <gy_t, D a_t>``.

Model parameters are switched to ``requires_grad=False`` during the pass and only the patch / token embedding
outputs require grad, so backward computes activation gradients only: no weight gradient is ever formed.
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
    features: Optional[torch.Tensor]  # [B, k] float32 projected gradients
    sq_norm: Optional[torch.Tensor]  # [B] float64 exact squared L2 norm of the gradient over selected params
    dots: Optional[torch.Tensor]  # [B, n_directions] float64 exact <g_z, d_j>
    img_emb: torch.Tensor  # [B, e] float32 unit-norm
    txt_emb: torch.Tensor  # [B, e] float32 unit-norm


class Directions:
    """A fixed set of n parameter-space directions, stacked per layer once (weights [n, d_out, d_in],
    biases [n, d_out]) so the hooks can contract with all of them in one matmul."""

    def __init__(self, engine: "PerSampleGradients", vectors: Sequence[ParamVector]):
        self.n = len(vectors)
        self.weight: dict[str, torch.Tensor] = {}
        self.bias: dict[str, torch.Tensor] = {}
        for name, layer in engine.layers.items():
            dev = layer.weight.device
            self.weight[name] = torch.stack([v[f"{name}.weight"] for v in vectors]).float().to(dev)
            if layer.bias is not None:
                self.bias[name] = torch.stack([v[f"{name}.bias"] for v in vectors]).float().to(dev)


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
                 precision: str = "fp32"):
        self.model = model
        self.layers = select_layers(model, include, exclude)
        device = next(model.parameters()).device
        self.device = device
        self.precision = precision
        self.projector = FactorizedProjector(
            {n: (m.out_features, m.in_features, m.bias is not None) for n, m in self.layers.items()},
            k=k, layer_k=layer_k, seed=seed, kind=kind, device=device)

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
            directions: Optional[Directions] = None, features: bool = True, norms: bool = True) -> PerSampleResult:
        """One forward + activation-only backward over a batch.

        images: [B, 3, H, W] preprocessed; tokens: [B, context] token ids. ``loss_fn`` maps the unit-norm
        embeddings to per-sample losses [B]; it must not mix samples (use a detached bank).
        """
        b = images.shape[0]
        proj = self.projector
        concat = torch.zeros(b, proj.concat_dim, device=self.device) if features else None
        sq = torch.zeros(b, dtype=torch.float64, device=self.device) if norms else None
        dots = torch.zeros(b, directions.n, dtype=torch.float64, device=self.device) if directions else None

        def on_grad(name: str, a: torch.Tensor, gy: torch.Tensor) -> None:
            a = a.reshape(b, -1, a.shape[-1]).float()  # [B, T, d_in]
            gy = gy.reshape(b, -1, gy.shape[-1]).float()  # [B, T, d_out]
            has_bias = self.layers[name].bias is not None
            gsum = gy.sum(1) if has_bias else None  # [B, d_out] bias gradient
            if concat is not None:
                block = proj.project_activations(name, a, gy)
                off = proj.offsets[name][0]
                concat[:, off:off + block.shape[1]] += block
            if sq is not None:
                if a.shape[1] == 1:
                    w2 = (gy.square().sum((1, 2)) * a.square().sum((1, 2)))
                else:
                    w2 = ((gy @ gy.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))
                sq.add_(w2.double())
                if has_bias:
                    sq.add_(gsum.square().sum(1).double())
            if dots is not None:
                dw = directions.weight[name]  # [n, d_out, d_in]
                z = (a @ dw.reshape(-1, dw.shape[-1]).T).view(b, a.shape[1], directions.n, -1)  # [B, T, n, d_out]
                dots.add_(torch.einsum("btno,bto->bn", z, gy).double())
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
        feats = concat @ proj.final().T if concat is not None else None
        return PerSampleResult(loss=loss.detach(), features=feats, sq_norm=sq, dots=dots,
                               img_emb=img.detach().float(), txt_emb=txt.detach().float())
