"""Vectors in the space of the selected parameters, as ``{parameter name: tensor}`` dicts (same shapes as the
parameters). Used for the shared per-checkpoint directions (v_t, G_B, u_t) and parameter perturbations."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

ParamVector = dict[str, torch.Tensor]


def dot(a: ParamVector, b: ParamVector) -> float:
    """<a, b> accumulated in float64."""
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


def norm(a: ParamVector) -> float:
    return dot(a, a) ** 0.5


@contextlib.contextmanager
def perturbed(params: dict[str, torch.nn.Parameter], direction: ParamVector, step: float) -> Iterator[None]:
    """Temporarily set theta <- theta + step * direction/||direction|| (L2 norm of the change = |step|).

    The original values are restored bit for bit from a saved copy (adding and subtracting would not be
    exact in floating point). Perturbations are applied in the parameters' dtype, which must be float32 or
    wider: a bf16 weight would round a small step away (shared/methods.md §1.8.6)."""
    n = norm(direction)
    if n == 0.0:
        raise ValueError("cannot perturb along a zero direction")
    saved = {k: params[k].detach().clone() for k in direction}
    try:
        with torch.no_grad():
            for k, d in direction.items():
                if params[k].dtype in (torch.float16, torch.bfloat16):
                    raise ValueError(f"parameter {k} is {params[k].dtype}; finite differences need fp32 weights")
                params[k].add_(d.to(params[k].dtype), alpha=step / n)
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
