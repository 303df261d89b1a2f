"""Diff-In's removal recursion solved in closed form inside the k-dim gradient sketch (``scores.diffin.form:
propagated``). Pure torch, no model: every input is a projected vector or matrix.

Removing z from training perturbs the parameters by delta_t = theta_t^{-z} - theta_t, which follows (methods §1.2)

    delta_{j+1} = (I - eta_j H_j) delta_j + (eta_j / N) g_z(theta_j).

The paper's estimator and the ``exact_increment`` form keep only the first term of the expansion of the product
of the (I - eta H) factors (delta_t ~ t eta g_z / N), which fails once t eta ||H|| is not small: on a trained
proxy it is large along the directions every sample pushes (the mean training gradient), and there the
truncation turns a damping factor that lies in (0, 1] into one that can change sign. Here the recursion is
solved instead. A checkpoint c stands for the Delta_c updates of its interval, over which the step size eta_c,
the Hessian H_c and z's gradient g_z(theta_c) are held fixed; then, with h_c = eta_c Delta_c (the summed step size)
and the continuous-time limit of the products,

    I(z, V) = <v_T, delta_T> = sum_c (h_c / N) < phi(h_c H_c) lambda_c , g_z(theta_c) >,
    lambda_C = v_T (the target gradient at the last checkpoint),  lambda_{c-1} = exp(-h_c H_c) lambda_c,

with phi(x) = (1 - e^{-x}) / x (the mean of the damping e^{-s x} over the interval, phi(0) = 1). lambda_c is the
adjoint: how a parameter change at the end of interval c moves the final target loss. Without curvature
(H = 0) this is TracIn with the final target gradient at every checkpoint; for h_c H_c >> 1 phi(h H) -> (h H)^-1,
an influence function's inverse Hessian restricted to the directions training has time to correct; the
directions it cannot correct in the time left keep their first-order weight. Removing a sample whose gradient
points where every other sample pushes too changes little, since the rest of the data makes up for it; removing
one that carries a direction only it and the target share changes the target loss until the end.

H_c is the Gauss-Newton (empirical Fisher) matrix of the per-sample loss, K_c = (1/n) sum_i P g_i P g_i^T over a
hash-picked subsample of the pool, in the sketch: for a Johnson-Lindenstrauss projection P, <P a, P b> ~ <a, b>, so
K_c's leading eigenpairs estimate those of the empirical Fisher in the same units, and phi and exp act on P v_T
directly (:func:`curvature`). Everything stays k-dimensional: the shared state per checkpoint is one k-vector
(:func:`propagated_directions`), and a sample's score is one dot with its projected gradient P g_z, which the scorer
forms anyway (and re-targeting reads from the stored features).

The step sizes h_c are in the units of the update the optimiser applies to a gradient. For SGD that is the LR. For
Adam(W) the update of parameter p is about eta / (sqrt(v_p) + eps) times its gradient; pruner.model.checkpoints.adam_step_scale
turns the checkpoint's second moments into one factor for the whole gradient, weighted by gradient energy (where
the Gauss-Newton matrix's leading directions lie).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Curvature:
    """K = U diag(eigvals) U^T: the sketched Gauss-Newton matrix of one checkpoint (float64)."""

    eigvals: torch.Tensor  # [r], >= 0, descending
    eigvecs: torch.Tensor  # [k, r], orthonormal columns

    def apply(self, fn, x: torch.Tensor) -> torch.Tensor:
        """f(h K) x for a scalar function with f(0) = 1, given as ``fn(eigvals) -> values``: on the complement of
        U's span K is 0 and f(0) = 1 leaves x unchanged. x: [k] or [k, j]."""
        u = self.eigvecs.to(x.dtype)
        coeff = u.T @ x
        scale = fn(self.eigvals.to(x.dtype)) - 1.0
        return x + u @ (scale[:, None] * coeff if x.ndim == 2 else scale * coeff)


def curvature(features: torch.Tensor, rank: int | None = None) -> Curvature:
    """The sketched Gauss-Newton matrix K = F^T F / n of projected per-sample gradients ``features`` [n, k] (any
    float dtype; computed in float64), as its top ``rank`` eigenpairs (default: all, min(n, k)). Eigenvalues below
    1e-12 of the largest are dropped (rounding)."""
    f = features.double()
    n = f.shape[0]
    if n == 0:
        raise ValueError("curvature needs at least one projected gradient")
    _, s, vh = torch.linalg.svd(f / n ** 0.5, full_matrices=False)
    lam = s.square()
    keep = lam > 1e-12 * lam[0].clamp_min(1e-300)
    if rank is not None:
        keep[rank:] = False
    return Curvature(eigvals=lam[keep], eigvecs=vh[keep].T.contiguous())


def phi(x: torch.Tensor) -> torch.Tensor:
    """(1 - e^{-x}) / x, with its limit 1 at 0 (series below 1e-6: 1 - x/2)."""
    small = x.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 - x / 2, -torch.expm1(-safe) / safe)


def propagated_directions(target: torch.Tensor, curvatures: Sequence[Curvature], steps: Sequence[float],
                          weights: Sequence[float]) -> list[torch.Tensor]:
    """The per-checkpoint k-vectors w_c with I(z, V) = sum_c <w_c, P g_z(theta_c)> (module docstring).

    ``target``: P v_T [k] or [k, j] (j target directions at once), the projected target gradient at the last
    checkpoint; ``curvatures``: K_c per checkpoint (:func:`curvature`); ``steps``: h_c, the summed step size of
    checkpoint c's interval; ``weights``: b_c = h_c / N (pruner.scores.shared.first_order_coefficient). Returns
    float64 tensors shaped like ``target``, in checkpoint order."""
    if not (len(curvatures) == len(steps) == len(weights)) or not curvatures:
        raise ValueError(f"one curvature, step and weight per checkpoint (got {len(curvatures)}, {len(steps)}, "
                         f"{len(weights)})")
    lam = target.double()
    out: list[torch.Tensor] = []
    for k_c, h, b in zip(reversed(curvatures), reversed(list(steps)), reversed(list(weights))):
        out.append(b * k_c.apply(lambda e: phi(h * e), lam))
        lam = k_c.apply(lambda e: torch.exp(-h * e), lam)
    return out[::-1]


def lanczos_apply(matvec, x: torch.Tensor, fn, steps: int = 30) -> torch.Tensor:
    """f(A) x for a symmetric positive semi-definite A known by its products ``matvec(v) = A v`` (1-D float64
    tensors), by the Lanczos method with full re-orthogonalisation: ||x|| Q_m f(T_m) e_1, exact when the Krylov space
    of ``steps`` vectors holds x's components (stops early when it does). For the parameter-space counterpart of the
    propagated form (pruner.deletion), where the matrix is the empirical Fisher at a checkpoint. Memory: ``steps``
    vectors of x's size."""
    beta0 = float(x.norm())
    if beta0 == 0.0:
        return torch.zeros_like(x)
    qs, alphas, betas = [x / beta0], [], []
    for _ in range(steps):
        w = matvec(qs[-1])
        alphas.append(float(w @ qs[-1]))
        for q in qs:  # full re-orthogonalisation (twice is enough in floating point)
            w = w - (w @ q) * q
        for q in qs:
            w = w - (w @ q) * q
        b = float(w.norm())
        if b <= 1e-10 * beta0 or len(qs) == x.numel():
            break
        betas.append(b)
        qs.append(w / b)
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(t)
    coeff = evecs @ (fn(evals.clamp_min(0)) * evecs[0])
    return beta0 * sum(c * q for c, q in zip(coeff.tolist(), qs[:m]))
