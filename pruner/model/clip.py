"""Building open_clip models for scoring: bundled tiny configs, preprocessing, tokenizer, and the
linearisation that makes every weight matrix an ``nn.Linear`` so hook-based per-sample gradients see it.

open_clip applies ``nn.MultiheadAttention``'s input projection functionally and the towers' output
projections with ``x @ proj``, so module hooks never fire for them (see shared/methods.md §6).
:func:`linearize_clip` swaps those for numerically equivalent ``nn.Linear`` modules holding the same
weights; ``tests/test_model.py`` checks the swapped model's embeddings against the original's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def register_configs(extra_config_file: Optional[str] = None) -> None:
    """Register pruner's bundled open_clip configs (and an optional user JSON config) with open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    if extra_config_file:
        open_clip.add_model_config(Path(extra_config_file))


def create_clip(arch: str, config_file: Optional[str] = None) -> tuple[nn.Module, Callable, Callable]:
    """Return ``(model, preprocess, tokenizer)`` for an open_clip architecture with random weights.

    Never downloads anything: weights come from pruner checkpoints (``pruner.model.checkpoints``).
    ``preprocess`` is open_clip's deterministic eval transform (resize, centre crop, normalise):
    scoring must not use training augmentations.
    """
    register_configs(config_file)
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown model.arch {arch!r} (fix: one of pruner-tiny, pruner-micro, an open_clip "
                         f"name such as ViT-B-32, or set model.config_file to a custom open_clip JSON config)")
    root = logging.getLogger()
    level, root.level = root.level, max(root.level, logging.ERROR)  # silence "no pretrained weights loaded"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    finally:
        root.setLevel(level)
    tokenizer = open_clip.get_tokenizer(arch)
    return model, preprocess, tokenizer


class LinearSelfAttention(nn.Module):
    """Multi-head self-attention whose projections are ``nn.Linear`` modules (``in_proj``: d -> 3d,
    ``out_proj``: d -> d), computing exactly what ``nn.MultiheadAttention`` computes for q = k = v.

    Call signature matches the use in open_clip's ``ResidualAttentionBlock``: returns ``(out, None)``.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("only packed-qkv self-attention can be linearised")
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        if (k_x is not None and k_x is not q_x) or (v_x is not None and v_x is not q_x):
            raise ValueError("LinearSelfAttention supports self-attention only")
        x = q_x if self.batch_first else q_x.transpose(0, 1)  # [B, T, d]
        b, t, d = x.shape
        h = self.num_heads
        q, k, v = self.in_proj(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each [B, h, T, d/h]
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = self.out_proj(o.transpose(1, 2).reshape(b, t, d))
        return (o if self.batch_first else o.transpose(0, 1)), None


class MatmulLinear(nn.Linear):
    """An ``nn.Linear`` (no bias) that also serves ``x @ module``, for open_clip's ``pooled @ self.proj``.

    ``weight`` is the transpose of open_clip's ``proj`` parameter ([out, in] instead of [in, out]).
    """

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def _proj_to_linear(proj: nn.Parameter, cls=nn.Linear) -> nn.Linear:
    lin = cls(proj.shape[0], proj.shape[1], bias=False)
    with torch.no_grad():
        lin.weight.copy_(proj.T)
    return lin.to(proj.device, proj.dtype)


def linearize_clip(model: nn.Module) -> nn.Module:
    """Swap, in place, every attention block and both output projections for ``nn.Linear``-based
    equivalents (same weights). Returns the model. Idempotent."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, child_name, LinearSelfAttention(child).to(child.in_proj_weight.device,
                                                                          child.in_proj_weight.dtype))
    visual = model.visual
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        proj = visual.proj
        del visual.proj
        visual.proj = _proj_to_linear(proj, MatmulLinear)
    if isinstance(getattr(model, "text_projection", None), nn.Parameter):
        proj = model.text_projection
        del model.text_projection
        model.text_projection = _proj_to_linear(proj)
    return model


def open_clip_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The open_clip state dict (original parameter names and layouts) of a model :func:`linearize_clip` changed: the
    inverse of the swap, so a linearised model whose weights were edited (pruner rescore --write-update) is saved as
    a checkpoint open_clip loads. ``attn.in_proj.weight`` -> ``attn.in_proj_weight`` (bias likewise), ``visual.proj``
    and ``text_projection`` back to [in, out] matrices; every other tensor keeps its name."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if name in ("visual.proj.weight", "text_projection.weight"):
            t = t.T.contiguous()
        out[open_clip_name(name)] = t
    return out


def open_clip_name(name: str) -> str:
    """The open_clip name of a parameter of a model :func:`linearize_clip` changed: ``attn.in_proj.weight`` ->
    ``attn.in_proj_weight`` (bias likewise), ``visual.proj.weight`` -> ``visual.proj``, ``text_projection.weight``
    -> ``text_projection``; every other name unchanged."""
    if name.endswith(".attn.in_proj.weight") or name.endswith(".attn.in_proj.bias"):
        return name.replace(".attn.in_proj.", ".attn.in_proj_")
    if name in ("visual.proj.weight", "text_projection.weight"):
        return name[: -len(".weight")]
    return name


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Text embeddings [B, e] (not normalised) of token ids [B, context], like ``model.encode_text``, without the
    padding after the batch's last end-of-text token.

    For an open_clip ``CLIP`` whose text tower is causal (``attn_mask``) and pooled at the end-of-text token
    (``text_pool_type == "argmax"``: the EOT id is the largest), a position after every sample's EOT can reach no
    pooled token, so the tower runs on the first ``max_b argmax(tokens_b) + 1`` positions only (with the positional
    embedding and causal mask cut to match). Same result up to float rounding (the GEMMs see fewer rows), and the
    text tower costs what the captions' length asks, not the context length (77 for the open_clip ViT models; CC3M
    captions are ~15 tokens). Any other model (no causal mask, other pooling, custom text towers) runs
    ``model.encode_text`` unchanged. One host sync per batch on CUDA (the cut length)."""
    mask = getattr(model, "attn_mask", None)
    if (not isinstance(model, open_clip.model.CLIP) or type(model).encode_text is not open_clip.model.CLIP.encode_text
            or getattr(model, "text_pool_type", None) != "argmax" or mask is None):
        return model.encode_text(tokens)
    eot = tokens.argmax(-1)  # [B]
    t = int(eot.max()) + 1
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :t]).to(cast) + model.positional_embedding[:t].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=mask[:t, :t]))
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Module) else x @ proj


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` modules of a linearised model by qualified name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def load_open_clip_state(model: nn.Module, state_dict: dict) -> None:
    """Load an open_clip state dict (original parameter names) into a model *before* linearisation."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the architecture: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
