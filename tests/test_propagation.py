"""Diff-In's propagated form (pruner.scores.propagation) against explicit references on small quadratic models, where
the Hessian is known exactly and training can be replayed step by step with and without a sample:

* the closed form equals the step-by-step recursion delta_{j+1} = (I - eta H) delta_j + (eta / N) g_z with z's
  gradient held at its checkpoint value over each interval (the form's one approximation besides the sketch), up to
  the continuous-time limit of the products (relative error O(eta lambda));
* on real gradient descent with and without z (the counterfactual itself), it predicts the change of the target
  loss where the truncated expansion of the exact_increment and taylor forms (delta_t ~ t eta g_z / N) fails once
  t eta ||H|| is not small;
* the sketched curvature is the eigendecomposition of F^T F / n; phi's small-argument limit; Adam's step scale
  against a hand computation and on a real AdamW checkpoint.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pruner.model.checkpoints import adam_step_scale
from pruner.scores.propagation import Curvature, curvature, phi, propagated_directions


def _quadratic(seed: int, d: int = 6, n: int = 40):
    """Least squares l_i(theta) = (x_i . theta - y_i)^2 / 2: per-sample Hessian x_i x_i^T, H = X^T X / n."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    xv = torch.randn(8, d, generator=g, dtype=torch.float64)
    yv = xv @ torch.randn(d, generator=g, dtype=torch.float64)
    return x, y, xv, yv


def _grad(x, y, theta):
    """Per-sample gradients [n, d] of (x . theta - y)^2 / 2."""
    return (x @ theta - y)[:, None] * x


def _target_grad(xv, yv, theta):
    return _grad(xv, yv, theta).mean(0)


def test_closed_form_equals_the_recursion_with_z_held_per_interval():
    """The sum over steps of the exact linear recursion (H constant, z's gradient fixed at its checkpoint value within
    each interval) equals sum_c <w_c, g_z(theta_c)> up to the continuous-time limit (eta lambda_max ~ 4e-3 here)."""
    x, y, xv, yv = _quadratic(0)
    n, d = x.shape
    hess = x.T @ x / n
    eta, steps = 1e-3, [0, 700, 1500, 3000]  # three intervals of uneven length
    theta = torch.zeros(d, dtype=torch.float64)
    thetas = []
    for j in range(steps[-1]):
        theta = theta - eta * _grad(x, y, theta).mean(0)
        if j + 1 in steps[1:]:
            thetas.append(theta.clone())
    z = 5
    gz = [_grad(x[z:z + 1], y[z:z + 1], t)[0] for t in thetas]  # g_z at each checkpoint
    delta = torch.zeros(d, dtype=torch.float64)
    for c in range(3):
        for _ in range(steps[c + 1] - steps[c]):
            delta = delta - eta * hess @ delta + eta / n * gz[c]
    v_final = _target_grad(xv, yv, thetas[-1])
    truth = float(v_final @ delta)
    evals, evecs = torch.linalg.eigh(hess)
    k = Curvature(evals.flip(0), evecs.flip(1))
    h = [eta * (steps[c + 1] - steps[c]) for c in range(3)]
    w = propagated_directions(v_final, [k] * 3, h, [hc / n for hc in h])
    closed = sum(float(wc @ g) for wc, g in zip(w, gz))
    assert abs(closed - truth) <= 5e-3 * abs(truth), (closed, truth)
    assert max(hc * float(evals[-1]) for hc in h) > 2  # the products are far from their first-order expansion


def _train(x, y, eta, steps, drop=None):
    """Full-batch GD on the mean loss (1/n) sum_i l_i; ``drop``: a sample left out (its term removed, 1/n kept)."""
    n, d = x.shape
    keep = torch.ones(n, dtype=torch.float64)
    if drop is not None:
        keep[drop] = 0
    theta = torch.zeros(d, dtype=torch.float64)
    out = {}
    for j in range(max(steps)):
        theta = theta - eta * (keep[:, None] * _grad(x, y, theta)).sum(0) / n
        if j + 1 in steps:
            out[j + 1] = theta.clone()
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_it_predicts_retraining_where_the_truncated_expansion_fails(seed):
    """Leave-one-out retraining by gradient descent (400 samples, 20 of them left out in turn, 20 checkpoints, t eta
    lambda_max ~ 40 at the end): the propagated form predicts the change of the target loss at Pearson > 0.99 and
    within 25% of the largest effect for every sample (measured 0.994-0.9999 and 2.5-18% over these seeds; what remains
    is z's gradient changing within an interval and the second order of the removal), while the first term of the
    expansion that the exact_increment form keeps, sum_t b_t (<v_t, g_z> - t eta <H v_t, g_z>), misses by more than
    10x the largest effect and does not even rank the samples (measured Spearman -0.58 to -0.03)."""
    x, y, xv, yv = _quadratic(seed, n=400)
    n, d = x.shape
    hess = x.T @ x / n
    eta, T, m = 2e-3, 4000, 20
    steps = [T * (c + 1) // m for c in range(m)]
    full = _train(x, y, eta, steps)
    base = float(((xv @ full[T] - yv) ** 2 / 2).mean())
    evals, evecs = torch.linalg.eigh(hess)
    k = Curvature(evals.flip(0), evecs.flip(1))
    h = [eta * (T // m)] * m
    w = propagated_directions(_target_grad(xv, yv, full[T]), [k] * m, h, [hc / n for hc in h])
    actual, propagated, truncated = [], [], []
    for z in range(0, n, 20):
        loo = _train(x, y, eta, [T], drop=z)[T]
        actual.append(float(((xv @ loo - yv) ** 2 / 2).mean()) - base)
        gz = [_grad(x[z:z + 1], y[z:z + 1], full[s])[0] for s in steps]
        propagated.append(sum(float(wc @ g) for wc, g in zip(w, gz)))
        truncated.append(sum(h[c] / n * float(_target_grad(xv, yv, full[s]) @ gz[c])
                             - s * eta * h[c] / n * float(hess @ _target_grad(xv, yv, full[s]) @ gz[c])
                             for c, s in enumerate(steps)))
    actual, propagated, truncated = map(np.array, (actual, propagated, truncated))
    scale = np.abs(actual).max()
    assert np.abs(propagated - actual).max() < 0.25 * scale
    assert np.corrcoef(propagated, actual)[0, 1] > 0.99
    assert np.abs(truncated - actual).max() > 10 * scale
    assert steps[-1] * eta * float(evals[-1]) > 20


def test_curvature_is_the_eigendecomposition_of_the_sketched_gauss_newton():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 8, generator=g) * torch.arange(1, 9)
    k = curvature(f)
    explicit = (f.double().T @ f.double()) / 50
    rebuilt = k.eigvecs @ torch.diag(k.eigvals) @ k.eigvecs.T
    torch.testing.assert_close(rebuilt, explicit, rtol=1e-10, atol=1e-10)
    assert torch.all(k.eigvals[:-1] >= k.eigvals[1:])
    assert curvature(f, rank=3).eigvals.shape == (3,)
    v = torch.randn(8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(k.apply(lambda e: torch.exp(-0.1 * e), v), torch.linalg.matrix_exp(-0.1 * explicit) @ v)
    lowrank = curvature(f[:3])  # rank 3 in 8 dims: phi = 1 on the complement
    out = lowrank.apply(lambda e: phi(2.0 * e), v)
    perp = v - lowrank.eigvecs @ (lowrank.eigvecs.T @ v)
    torch.testing.assert_close(out - lowrank.eigvecs @ (lowrank.eigvecs.T @ out), perp)


def test_phi():
    x = torch.tensor([0.0, 1e-9, 1e-3, 1.0, 50.0], dtype=torch.float64)
    want = torch.tensor([1.0, 1 - 5e-10, (1 - np.exp(-1e-3)) / 1e-3, 1 - np.exp(-1.0), (1 - np.exp(-50)) / 50],
                        dtype=torch.float64)
    torch.testing.assert_close(phi(x), want, rtol=1e-12, atol=0)


def test_adam_step_scale(tmp_path):
    """Against a hand computation, and on a real AdamW checkpoint (the open_clip format train-proxy writes):
    optimizer_step_scale reads its second moments; SGD with momentum 0.9 gives 1 / (1 - 0.9)."""
    from pruner.model.checkpoints import optimizer_step_scale
    v = [torch.tensor([4e-6, 1e-4]), torch.tensor([[9e-6]])]
    steps, beta2, eps = [10, 10], 0.999, 1e-8
    hat = [t.double() / (1 - beta2 ** 10) for t in v]
    want = sum(float((h / (h.sqrt() + eps)).sum()) for h in hat) / sum(float(h.sum()) for h in hat)
    assert adam_step_scale(v, steps, beta2, eps) == pytest.approx(want, rel=1e-12)
    assert adam_step_scale([torch.zeros(3)], [5], beta2, eps) == 1.0

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().sum().backward()
        opt.step()
    torch.save({"step": 3, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pt")
    st = opt.state_dict()["state"].values()
    assert optimizer_step_scale(str(tmp_path / "a.pt")) == pytest.approx(
        adam_step_scale([s["exp_avg_sq"] for s in st], [int(s["step"]) for s in st], 0.999, 1e-8), rel=1e-12)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"step": 3, "state_dict": model.state_dict(), "optimizer": sgd.state_dict()}, tmp_path / "s.pt")
    assert optimizer_step_scale(str(tmp_path / "s.pt")) == pytest.approx(10.0)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert optimizer_step_scale(str(tmp_path / "bare.pt")) == 1.0
