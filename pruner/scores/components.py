"""Per-sample, per-checkpoint score components (pure torch).

At checkpoint t with shared quantities (v_X, G, u_X = H_B v_X, eigenpairs of H_B), for each pool sample z:

=================  ==============================================  =============================================
component          definition                                      how
=================  ==============================================  =============================================
loss               l_z(theta_t) (bank loss)                        base pass
sq_norm            ||g_z||^2 over the selected parameters          base pass, exact
clip_score         cos(x_z, y_z)                                   base pass
l1_feat            ||P g_z||_1 of the projected gradient            base pass
tracin_target      <g_z, v_target>                                 base pass, exact dot
tracin_pred        <g_z, v_pred>                                   base pass, exact dot
t1_target/train    <u_X, g_z> = <v_X, H_B g_z>                     base pass, exact dot (H_B symmetric)
t1_self            g_z^T H_B g_z ~ sum_k lambda_k <q_k, g_z>^2     base pass, exact dots with top-r eigvecs
t2_target/train    <v_X, H_z G> = D_G <g_z, v_X>                   finite difference along G^ (see below)
t2_self            <g_z, H_z G> = D_G (1/2 ||g_z||^2)               same passes, exact norms
tracin_train       <g_z, G>                                        base pass, exact dot (exact_increment, train)
prop_target/train  <w_t^X, P g_z>                                  base pass, projected (propagated form)
prop_self          b_t P g_z^T phi(h_t K_t) P g_z                  base pass, projected (propagated form)
=================  ==============================================  =============================================

Which of these a checkpoint needs depends on Diff-In's ``form`` (pruner.scores.combine): ``taylor`` (the paper's)
uses T1 and T2; ``exact_increment`` uses T1 and the first-order dots (tracin_target, tracin_train, sq_norm) and no
T2, so it has no finite-difference pass at all; ``propagated`` (pruner.scores.propagation) uses the projected
gradient P g_z of the base pass with the k-vectors w_t^X of every checkpoint, which the scorer derives from all
checkpoints' shared quantities (``prop_directions``), and no Hessian-vector product.

In the exact_increment form (the default) the base pass at theta_t is the only pass, in the model's precision.
With bf16 / fp16 its rounding of the first-order dots can exceed the second-order a_t T1 term (~1e-4 of them on
an AdamW trajectory), so diffin_* is then TracIn-like plus rounding; use fp32 where that term matters.

T2 (taylor form) by finite differences of exact per-sample quantities at theta_t +- eps * G/||G|| (frozen bank, fixed
directions): central ``[f(+eps) - f(-eps)] ||G|| / (2 eps)`` (default, O(eps^2)) or forward
``[f(+eps) - f(0)] ||G|| / eps`` (O(eps), the base pass is f(0)). Each pass is a forward + activation-only
backward; perturbed weights stay float32 (TF32 must be off; :func:`strict_fp32`).

The "base pass" with central differences is by default (``base_pass="midpoint"``) not a third pass: the base
quantities are the mean of the two FD passes, f(0) + (eps^2 / 2) f''(0) + O(eps^4), i.e. exact to O(eps^2) like
T2 itself (measured on pruner-micro: tests/test_scores.py). Diff-In then costs two passes instead of three.
``base_pass="exact"`` adds the pass at theta_t (in the model's precision). Without Diff-In (TracIn / OGA /
baselines only) there is no FD pass and the base pass at theta_t is the only one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from pruner.grads.engine import PerSampleGradients, PerSampleResult
from pruner.grads.vectors import norm, perturbed
from pruner.model.loss import bank_loss, in_batch_detached_loss
from pruner.scores.propagation import phi as propagation_phi
from pruner.scores.shared import CheckpointShared

BASE_DIRECTIONS = ("v_target", "v_pred", "u_target", "u_train")


def strict_fp32() -> None:
    """Disable TF32 everywhere: its 10-bit mantissa destroys finite differences (methods.md §1.8.6)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


class CheckpointScorer:
    """Computes the components above for batches of pool samples at one checkpoint."""

    def __init__(self, engine: PerSampleGradients, shared: CheckpointShared, targets=("target", "train"),
                 fd_eps: float = 1e-2, fd_scheme: str = "central", loss: str = "bank", base_pass: str = "midpoint",
                 features: bool = True, norms: bool = True, form: str = "exact_increment",
                 prop_directions: Optional[dict[str, torch.Tensor]] = None, prop_step: float = 0.0,
                 prop_weight: float = 0.0):
        """``prop_directions`` ({"target" / "train": w_t [k]}), ``prop_step`` (h_t) and ``prop_weight`` (b_t): this
        checkpoint's part of Diff-In's propagated form (pruner.scores.propagation; given with form "propagated")."""
        if form == "taylor" and fd_scheme == "forward" and engine.precision != "fp32":
            raise ValueError("fd_scheme 'forward' reuses the base pass, which must then run in fp32 "
                             "(fix: model.precision: fp32 or scores.diffin.fd_scheme: central)")
        if base_pass not in ("midpoint", "exact"):
            raise ValueError(f"base_pass {base_pass!r}: one of midpoint, exact")
        if form not in ("taylor", "exact_increment", "propagated"):
            raise ValueError(f"form {form!r}: one of taylor, exact_increment, propagated")
        self.form = form
        self.prop = {k: v.double() for k, v in (prop_directions or {}).items()}
        self.prop_step, self.prop_weight = prop_step, prop_weight
        self.l1 = features  # the job reads P g_z (OGA's L1 norm, stored features)
        if form == "propagated":
            features = True  # the propagated terms are dots with the projected gradient
        self.engine, self.shared = engine, shared
        self.targets = set(targets)
        # what the job reads (Scorer.set_shared): projected features (OGA, stored features) and exact norms (TracIn
        # self-influence, OGA L2, Diff-In self); a pass that forms neither only contracts with the directions
        self.features, self.norms = features, norms or "self" in self.targets
        self.fd_eps, self.fd_scheme, self.base_pass = fd_eps, fd_scheme, base_pass
        vec = shared.vectors
        self.base_names = [n for n in BASE_DIRECTIONS if n in vec]
        if form == "propagated":
            self.base_names = [n for n in ("v_target", "v_pred") if n in vec]  # TracIn's exact dots only
        elif "train" in self.targets and (fd_scheme == "forward" or form == "exact_increment"):
            # the forward difference reuses <g_z, G> at theta_t; exact_increment's first-order train term is it
            self.base_names.append("G")
        if "self" in self.targets and form != "propagated":
            self.base_names += [f"q{j}" for j in range(len(shared.eigvals))]
        self.t2_names = [] if form != "taylor" else \
            [n for n, t in (("v_target", "target"), ("G", "train")) if t in self.targets]
        # every pass contracts with all directions at once: with per-sample weight gradients formed in the hooks
        # an extra direction costs one GEMV over them, not another forward (pruner.grads.engine)
        self.names = self.base_names + [n for n in self.t2_names if n not in self.base_names]
        self.dirs = engine.directions([vec[n] for n in self.names]) if self.names else None
        self.g_norm = norm(vec["G"])
        self.loss = loss

    def loss_fn(self, uids: Optional[Sequence[str]] = None):
        """The per-sample loss of a batch of pairs with these uids (None: no pair is a bank member): against the
        bank with each member's own row left out, or the in-batch variant."""
        sh = self.shared
        if self.loss == "bank":
            own = None if uids is None else sh.own_rows(uids)
            return lambda i, t: bank_loss(i, t, sh.bank_img, sh.bank_txt, sh.scale, own)
        return lambda i, t: in_batch_detached_loss(i, t, sh.scale)

    def _fd_pass(self, images, tokens, loss_fn, step: float, features: bool) -> PerSampleResult:
        """One finite-difference pass at theta_t + step * G^, always in fp32; features left unreduced."""
        eng = self.engine
        saved, eng.precision = eng.precision, "fp32"
        try:
            with perturbed(eng.params(), self.shared.vectors["G"], step):
                return eng.run(images, tokens, loss_fn, directions=self.dirs, features=features,
                               norms=self.norms, reduce=False)
        finally:
            eng.precision = saved

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor, uids: Optional[Sequence[str]] = None,
                 features: bool = True):
        """Returns ({component: float64 array [B]}, features [B, k] float32 array or None)."""
        arrays, feats, _ = self.compute(images, tokens, uids, project_hzg=False)
        return arrays, (feats if features else None)

    def compute(self, images: torch.Tensor, tokens: torch.Tensor, uids: Optional[Sequence[str]] = None,
                project_hzg: bool = False):
        """Returns (components {name: float64 [B]}, P g_z [B, k] float32 or None, P H_z G_B [B, k] float32 or None).
        ``uids`` [B]: the pairs' uids (a bank member's own bank row is masked in its loss; None: no pair is one).

        Without ``features`` (set at construction) there is no P g_z and no l1_feat component, without ``norms`` no
        sq_norm (and no t2_self: the "self" target turns norms on).

        With ``project_hzg`` the finite-difference passes also project the per-sample gradients, giving the
        projected Hessian-gradient product P H_z G_B = [P g_z(+eps) - P g_z(-eps)] ||G|| / (2 eps). Stored next
        to P g_z it lets a new target v' be scored without gradient passes: T1 ~ <P u', P g_z>,
        T2 ~ <P v', P H_z G_B> (pruner rescore)."""
        if project_hzg and self.form != "taylor":
            raise ValueError("P H_z G_B is a term of Diff-In's taylor form only (features.save_hzg)")
        eps = self.fd_eps
        fd = bool(self.t2_names) or ("self" in self.targets and self.form == "taylor") or project_hzg
        features = self.features or project_hzg
        loss_fn = self.loss_fn(uids)
        if fd and self.fd_scheme == "central" and self.base_pass == "midpoint":
            plus = self._fd_pass(images, tokens, loss_fn, eps, features)
            minus = self._fd_pass(images, tokens, loss_fn, -eps, features)
            r = midpoint(plus, minus)
        else:
            r = self.engine.run(images, tokens, loss_fn, directions=self.dirs, features=features,
                                norms=self.norms, reduce=False)
            if fd:
                plus = self._fd_pass(images, tokens, loss_fn, eps, project_hzg)
                minus = self._fd_pass(images, tokens, loss_fn, -eps, project_hzg) if self.fd_scheme == "central" else r
        # every pass leaves its features as the stage-1 sketch, which is linear in the gradient: the midpoint and the
        # difference are formed there and reduced to k dims once each, not once per pass
        feats = self.engine.projector.reduce(r.features) if self.features else None
        out = {"loss": r.loss, "clip_score": (r.img_emb * r.txt_emb).sum(-1).double()}
        if self.norms:
            out["sq_norm"] = r.sq_norm
        if feats is not None and self.l1:
            out["l1_feat"] = feats.abs().sum(-1).double()
        dots = {n: r.dots[:, j] for j, n in enumerate(self.names)}
        for name in ("target", "pred"):
            if f"v_{name}" in dots:
                out[f"tracin_{name}"] = dots[f"v_{name}"]
        if self.form == "exact_increment" and "train" in self.targets:
            out["tracin_train"] = dots["G"]
        if self.form == "propagated":
            f64 = feats.double()
            for name, w in self.prop.items():
                out[f"prop_{name}"] = f64 @ w.to(f64.device)
            if "self" in self.targets:
                phi_g = self.shared.curvature.apply(lambda e: propagation_phi(self.prop_step * e.double()),
                                                    f64.T.contiguous()).T
                out["prop_self"] = self.prop_weight * (f64 * phi_g).sum(-1)
        else:
            for name in ("target", "train"):
                if name in self.targets:
                    out[f"t1_{name}"] = dots[f"u_{name}"]
            if "self" in self.targets:
                out["t1_self"] = sum(lam * dots[f"q{j}"].square() for j, lam in enumerate(self.shared.eigvals))
        hzg = None
        if fd:
            scale = self.g_norm / (2 * eps if self.fd_scheme == "central" else eps)
            for n in self.t2_names:
                j = self.names.index(n)
                out[f"t2_{'target' if n == 'v_target' else 'train'}"] = (plus.dots[:, j] - minus.dots[:, j]) * scale
            if "self" in self.targets:  # a finite-difference pass runs in the taylor form only
                out["t2_self"] = 0.5 * (plus.sq_norm - minus.sq_norm) * scale
            if project_hzg:
                hzg = (self.engine.projector.reduce(plus.features - minus.features) * scale).cpu().numpy()
        arrays = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in out.items()}
        return arrays, (None if feats is None or not self.l1 else feats.cpu().numpy()), hzg


def midpoint(plus: PerSampleResult, minus: PerSampleResult) -> PerSampleResult:
    """The per-sample quantities at theta_t estimated from the two central-difference passes at theta_t +- eps G^:
    their mean, which is exact up to O(eps^2) (the same order as the central difference itself); embeddings are
    re-normalised to unit length."""
    def mean(a, b):
        return None if a is None else 0.5 * (a + b)

    def unit(a, b):
        m = a + b
        return m / m.norm(dim=-1, keepdim=True)

    return PerSampleResult(loss=mean(plus.loss, minus.loss), features=mean(plus.features, minus.features),
                           sq_norm=mean(plus.sq_norm, minus.sq_norm), dots=mean(plus.dots, minus.dots),
                           img_emb=unit(plus.img_emb, minus.img_emb), txt_emb=unit(plus.txt_emb, minus.txt_emb))
