"""Influence scores (pruner.scores.*) against brute-force definitions on pruner-micro (32 px):

* shared vectors: finite-difference u = H_B v against exact double-backward HVPs;
* per-sample T2 terms (finite differences of exact dots / norms along G) against double backward, and their
  O(eps^2) convergence;
* t1_self against the eigen-decomposition definition;
* the batched Diff-In and TracIn scores (components + ``combine``) against a direct per-sample evaluation of the
  formulas of shared/methods.md sections 1 and 2 over two checkpoints;
* Diff-In's exact_increment form (the default) against the same direct evaluation;
* signs on a constructed case (a caption swapped to the other colour must come out harmful: TracIn and Diff-In's
  exact_increment form do; the paper's taylor form does not on an AdamW trajectory, an expected failure with its
  measured reasons pinned by two tests);
* OGA isolation-forest determinism and outlier ranking; hash_unit.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import hvp

from pruner.grads.engine import PerSampleGradients
from pruner.grads.vectors import dot, norm
from pruner.model.clip import create_clip, linearize_clip
from pruner.model.loss import bank_loss, clip_batch_loss, encode_pairs, logit_scale_of
from pruner.scores.combine import combine
from pruner.scores.methods.baselines import hash_unit
from pruner.scores.components import CheckpointScorer, strict_fp32
from pruner.scores.oga import fit_isolation_forest, iforest_scores
from pruner.scores.shared import compute_shared
from pruner.scores.weights import diffin_coefficient, first_order_coefficient

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pruner" / "demo"
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def _fp32():
    strict_fp32()


# -- data --------------------------------------------------------------------------------------------------------
def _read_samples(shards, max_samples=None):
    """[(image PIL, caption, label, classname)] from WebDataset shards (pruner's reader when available)."""
    out = []
    try:
        from pruner.io.shards import read_shard
        for s in shards:
            for smp in read_shard(str(s))[0]:
                out.append((smp.image, smp.caption, smp.meta.get("label"), smp.meta.get("classname")))
    except ImportError:  # pragma: no cover - fallback reader
        import io
        import tarfile

        from PIL import Image
        for s in shards:
            groups: dict = {}
            with tarfile.open(s, "r|*") as tf:
                for m in tf:
                    if m.isfile() and "." in m.name:
                        key, ext = m.name.split(".", 1)
                        groups.setdefault(key, {})[ext] = tf.extractfile(m).read()
            for key, parts in groups.items():
                meta = json.loads(parts.get("json", b"{}"))
                out.append((Image.open(io.BytesIO(parts["jpg"])).convert("RGB"), parts["txt"].decode().strip(),
                            meta.get("label"), meta.get("classname")))
    return out[:max_samples] if max_samples else out


def _pool_and_target():
    pool_shards = sorted((DEMO / "pool").glob("*.tar.gz"))
    target_shards = sorted((DEMO / "target").glob("*.tar.gz"))
    if pool_shards and target_shards:
        return _read_samples(pool_shards), _read_samples(target_shards)
    train = sorted((SHARED_CIFAR / "train").glob("*.tar*"))[:2]
    test = sorted((SHARED_CIFAR / "test").glob("*.tar*"))[:1]
    if not train or not test:
        pytest.skip("no demo pool and no shared CIFAR-10 shards")
    return _read_samples(train, 1000), _read_samples(test, 200)


@pytest.fixture(scope="module")
def corpus():
    return _pool_and_target()


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model, preprocess, tokenizer = create_clip("pruner-micro")
    return linearize_clip(model).eval(), preprocess, tokenizer


def _tensors(preprocess, tokenizer, samples, captions=None):
    return (torch.stack([preprocess(s[0]) for s in samples]),
            tokenizer(captions if captions is not None else [s[1] for s in samples]))


@pytest.fixture(scope="module")
def pairs(micro, corpus):
    """Preprocessed pool pairs (images [n,3,32,32], tokens [n,16]) and target pairs."""
    _, preprocess, tokenizer = micro
    pool, target = corpus
    return _tensors(preprocess, tokenizer, pool[:400]), _tensors(preprocess, tokenizer, target)


def _batches(images, tokens, start, n, size):
    return [(images[i:i + size], tokens[i:i + size]) for i in range(start, start + n, size)]


def _sgd(model, images, tokens, steps, lr=0.1, batch=32, seed=0):
    """``steps`` plain SGD steps of the in-batch CLIP loss, in place; returns the model in eval mode."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        img, txt = encode_pairs(model, images[idx], tokens[idx])
        opt.zero_grad()
        clip_batch_loss(img, txt, logit_scale_of(model)).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


# -- exact references ----------------------------------------------------------------------------------------------
def _grad(params, loss):
    names = list(params)
    return {n: g.detach() for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names]))}


def _rel(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| for parameter vectors."""
    return norm({n: a[n].double() - b[n].double() for n in b}) / norm(b)


class Setting:
    """One checkpoint with its bank, target and reference batches, and the exact (autograd) shared vectors."""

    def __init__(self, model, pool, target, bank=(200, 64), ref=(300, 32, 16)):
        self.model = model
        self.engine = PerSampleGradients(model, k=256)
        self.params = self.engine.params()
        self.bank_batches = _batches(*pool, bank[0], bank[1], 32)
        self.target_batches = _batches(*target, 0, 40, 20)
        self.ref_batches = _batches(*pool, ref[0], ref[1], ref[2])
        self.scale = logit_scale_of(model)
        with torch.no_grad():
            self.bank = encode_pairs(model, torch.cat([b[0] for b in self.bank_batches]),
                                     torch.cat([b[1] for b in self.bank_batches]))
        n = sum(b[0].shape[0] for b in self.target_batches)
        img, txt = encode_pairs(model, torch.cat([b[0] for b in self.target_batches]),
                                torch.cat([b[1] for b in self.target_batches]))
        self.v = _grad(self.params, bank_loss(img, txt, *self.bank, self.scale).sum() / n)
        img, txt = encode_pairs(model, torch.cat([b[0] for b in self.target_batches]),
                                torch.cat([b[1] for b in self.target_batches]))
        self.v_pred = _grad(self.params, -(self.scale * (img.double() * txt.double()).sum(-1)).sum() / n)
        self.G = _grad(self.params, self.ref_loss())

    def ref_loss(self):
        total = 0.0
        for images, tokens in self.ref_batches:
            img, txt = encode_pairs(self.model, images, tokens)
            total = total + clip_batch_loss(img, txt, self.scale)
        return total / len(self.ref_batches)

    def sample_loss(self, image, token):
        img, txt = encode_pairs(self.model, image[None], token[None])
        return bank_loss(img, txt, *self.bank, self.scale).sum()

    def sample_grad(self, image, token):
        return _grad(self.params, self.sample_loss(image, token))

    def shared(self, targets, self_rank=0, index=0, step=1, eta=1.0, a_t=1.0, hvp_eps=1e-2):
        return compute_shared(self.engine, index=index, step=step, eta=eta, a_t=a_t,
                              bank_batches=self.bank_batches, target_batches=self.target_batches,
                              reference_batches=self.ref_batches, targets=targets, hvp_eps=hvp_eps,
                              self_rank=self_rank)


@pytest.fixture(scope="module")
def random_setting(micro, pairs):
    return Setting(micro[0], *pairs)


@pytest.fixture(scope="module")
def trained_setting(micro, pairs):
    return Setting(_sgd(copy.deepcopy(micro[0]), *pairs[0], steps=6), *pairs)


# -- shared vectors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["random", "trained"])
def test_shared_vectors_and_fd_hvp(which, request):
    st = request.getfixturevalue(f"{which}_setting")
    sh = st.shared(["target", "train"])
    # the shared first-order vectors are the autograd gradients
    assert _rel(sh.vectors["v_target"], st.v) < 1e-5
    assert _rel(sh.vectors["v_pred"], st.v_pred) < 1e-5
    assert _rel(sh.vectors["G"], st.G) < 1e-5
    torch.testing.assert_close(sh.bank_img, st.bank[0].float())
    assert sh.scale == st.scale
    # u = H_B v by central finite differences (hvp_eps = 1e-2) against double backward
    for name, src in (("u_target", st.v), ("u_train", st.G)):
        exact = hvp(st.ref_loss, st.params, src)
        err = _rel(sh.vectors[name], exact)
        assert err < 1e-2, (which, name, err)
    # the model is restored bit for bit after the perturbations
    before = {n: p.detach().clone() for n, p in st.model.state_dict(keep_vars=True).items()}
    st.shared(["target"])
    after = st.model.state_dict(keep_vars=True)
    assert all(torch.equal(before[n], after[n].detach()) for n in before)


# -- T2 terms and t1_self -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def t2_case(micro, pairs):
    st = Setting(micro[0], *pairs, ref=(300, 16, 16))
    images, tokens = pairs[0][0][:6], pairs[0][1][:6]
    sh = st.shared(["target", "train", "self"], self_rank=2)
    G, v = sh.vectors["G"], sh.vectors["v_target"]
    exact = {"t2_target": [], "t2_train": [], "t2_self": []}
    grads = []
    for b in range(images.shape[0]):
        g = st.sample_grad(images[b], tokens[b])
        hz_g = hvp(lambda: st.sample_loss(images[b], tokens[b]), st.params, G)
        exact["t2_target"].append(dot(v, hz_g))
        exact["t2_train"].append(dot(G, hz_g))
        exact["t2_self"].append(dot(g, hz_g))
        grads.append(g)
    exact = {k: np.array(x) for k, x in exact.items()}

    def fd(eps, scheme="central", base_pass="exact"):
        comp, _ = CheckpointScorer(st.engine, sh, targets=["target", "train", "self"], fd_eps=eps,
                                   fd_scheme=scheme, base_pass=base_pass, form="taylor")(images, tokens)
        return comp

    return st, sh, images, tokens, exact, grads, fd


def _fd_errors(comp, exact):
    """{term: (max per-sample relative error, ||fd - exact|| / ||exact||)}."""
    out = {}
    for k, want in exact.items():
        got = comp[k]
        out[k] = (float(np.max(np.abs(got - want) / np.abs(want))),
                  float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    return out


def test_shared_state_is_stored_compactly(t2_case, tmp_path):
    """A shared state with self-influence eigenvectors (per-layer views of one flat buffer) is saved in about its
    tensors' own bytes, also after a pickle round trip (what Ray's serialisation does to each view: before the fix,
    every layer of every eigenvector carried the whole flat buffer, 34 layers here, ~12x the file size)."""
    import pickle

    from pruner.scores.shared import CheckpointShared, load_state, save_state
    _, sh, *_ = t2_case
    assert any(k.startswith("q") for k in sh.vectors)
    state = pickle.loads(pickle.dumps(sh.to_state()))
    tensors = [state["bank_img"], state["bank_txt"]] + [t for v in state["vectors"].values() for t in v.values()]
    own = sum(t.numel() * t.element_size() for t in tensors)
    path = tmp_path / "ckpt-0.pt"
    save_state(state, path)
    assert path.stat().st_size <= 1.05 * own + 256 * 1024, (path.stat().st_size, own)
    back = CheckpointShared.from_state(load_state(path))
    for name, vec in sh.vectors.items():
        for layer, t in vec.items():
            torch.testing.assert_close(back.vectors[name][layer], t, rtol=0, atol=0)


def test_t2_terms_match_double_backward(t2_case):
    *_, exact, _, fd = t2_case
    errs = _fd_errors(fd(1e-2), exact)
    for k, (max_rel, _) in errs.items():
        assert max_rel < 1e-2, (k, errs)
    # the terms are not degenerate
    for k, want in exact.items():
        assert np.all(np.abs(want) > 0), k


def test_t2_step_halving_is_second_order(t2_case):
    *_, exact, _, fd = t2_case
    e1, e2 = _fd_errors(fd(1e-2), exact), _fd_errors(fd(5e-3), exact)
    for k in exact:
        ratio = e1[k][1] / e2[k][1]
        assert e2[k][1] < e1[k][1] and ratio > 2, (k, e1[k], e2[k], ratio)


def test_forward_scheme_is_first_order(t2_case):
    """The forward scheme (one extra pass) is consistent too, with O(eps) error: worse than central at the same
    step, and roughly halving with the step."""
    *_, exact, _, fd = t2_case
    c = _fd_errors(fd(1e-2), exact)
    f1, f2 = _fd_errors(fd(1e-2, "forward"), exact), _fd_errors(fd(5e-3, "forward"), exact)
    for k in ("t2_target", "t2_train"):
        assert f1[k][1] < 0.2 and f1[k][1] > c[k][1], (k, c[k], f1[k])
        assert 1.4 < f1[k][1] / f2[k][1] < 2.8, (k, f1[k], f2[k])


BASE_COMPONENTS = ("loss", "sq_norm", "clip_score", "l1_feat", "tracin_target", "tracin_pred", "t1_target",
                   "t1_train", "t1_self")


def test_midpoint_base_is_second_order(t2_case):
    """The default base_pass='midpoint' takes the base components from the mean of the two FD passes: the same T2,
    base components within 1e-2 of the exact pass at theta_t (measured at eps=1e-2: loss 1.4e-4, TracIn dots
    7e-4, sq_norm 1.0e-3, t1_self 1.5e-3, relative L2), and the error falls ~4x when eps halves (O(eps^2))."""
    *_, fd = t2_case
    exact = fd(1e-2)
    mid1, mid2 = fd(1e-2, base_pass="midpoint"), fd(5e-3, base_pass="midpoint")
    for k in ("t2_target", "t2_train", "t2_self"):
        np.testing.assert_array_equal(mid1[k], exact[k])
    for k in BASE_COMPONENTS:
        e1 = np.linalg.norm(mid1[k] - exact[k]) / np.linalg.norm(exact[k])
        e2 = np.linalg.norm(mid2[k] - exact[k]) / np.linalg.norm(exact[k])
        assert 0 < e1 < 1e-2, (k, e1)
        assert e2 < e1 / 3, (k, e1, e2)


def test_diffin_alone_skips_features_and_norms(t2_case):
    """A job that reads neither projected features nor exact norms (``scores.methods: [diffin]`` without the self
    target, ``features.save: false``; pruner.scorer.computed_quantities) gets the same Diff-In components from passes
    that form neither: no P g_z, no sq_norm / l1_feat, and every other component bit for bit equal."""
    st, sh, images, tokens, *_ = t2_case
    kw = dict(targets=["target", "train"], fd_eps=1e-2, form="taylor")
    full, feats, _ = CheckpointScorer(st.engine, sh, **kw).compute(images, tokens)
    alone, none, _ = CheckpointScorer(st.engine, sh, features=False, norms=False, **kw).compute(images, tokens)
    assert feats.shape == (images.shape[0], st.engine.projector.k) and none is None
    assert set(full) - set(alone) == {"sq_norm", "l1_feat"} and set(alone) <= set(full)
    for k in alone:
        np.testing.assert_array_equal(alone[k], full[k], err_msg=k)
    cols = combine([alone], [0.5], [-2.0], [str(i) for i in range(images.shape[0])])
    assert {"diffin_target", "diffin_train", "tracin_target"} <= set(cols)
    assert not {"tracin_self", "oga_l2", "oga_l1"} & set(cols)
    # the self target needs the norms (t2_self): they are formed whatever the flag says
    with_self = CheckpointScorer(st.engine, sh, features=False, norms=False, targets=["self"], fd_eps=1e-2,
                                 form="taylor")
    assert "t2_self" in with_self.compute(images, tokens)[0]


def test_exact_increment_self_column():
    """In the exact_increment form diffin_self is -I(z,z) = -sum_t (b_t ||g_z||^2 + a_t t1_self): high
    self-influence ranks lowest, as in tracin_self."""
    per = [{"sq_norm": np.array([1.0, 4.0]), "t1_self": np.array([2.0, 1.0]), "loss": np.zeros(2),
            "clip_score": np.zeros(2)},
           {"sq_norm": np.array([3.0, 2.0]), "t1_self": np.array([1.0, 5.0]), "loss": np.zeros(2),
            "clip_score": np.zeros(2)}]
    cols = combine(per, [1.0, 1.0], [-0.1, -0.2], ["a", "b"], b_ts=[0.5, 0.25])
    np.testing.assert_allclose(cols["diffin_self"], [-(0.5 * 1 - 0.1 * 2 + 0.25 * 3 - 0.2 * 1),
                                                     -(0.5 * 4 - 0.1 * 1 + 0.25 * 2 - 0.2 * 5)])
    taylor = combine([{**p, "t2_self": np.ones(2)} for p in per], [1.0, 1.0], [-0.1, -0.2], ["a", "b"])
    np.testing.assert_allclose(taylor["diffin_self"], [-0.1 * 3 - 0.2 * 2, -0.1 * 2 - 0.2 * 6])


def test_propagated_terms_against_projected_exact_gradients(micro, pairs):
    """Diff-In's propagated form, one checkpoint: the sketched curvature is F^T F / n of the projected exact per-sample
    gradients (torch.autograd, projected with project_weights), P v_target and P G are the projected autograd
    vectors, and the scorer's prop_target / prop_train / prop_self components are <w, P g_z> and
    b P g_z^T phi(h K) P g_z with phi(hK) formed by an explicit eigendecomposition (rtol 1e-4: float32 sketches)."""
    from pruner.scores.propagation import phi
    st = Setting(micro[0], *pairs, ref=(300, 16, 16))
    curv = _batches(*pairs[0], 100, 48, 24)
    sh = compute_shared(st.engine, index=0, step=10, eta=1.0, a_t=1.0, bank_batches=st.bank_batches,
                        target_batches=st.target_batches, reference_batches=st.ref_batches,
                        targets=["target", "train", "self"], hvp_eps=1e-2, self_rank=1, form="propagated",
                        curvature_batches=curv, step_scale=3.0)
    assert not any(k.startswith(("u_", "q")) for k in sh.vectors) and sh.step_scale == 3.0  # no HVP at all
    proj = st.engine.projector

    def pg(image, token):
        return proj.project_weights(st.sample_grad(image, token)).double()

    f = torch.stack([pg(i, t) for b in curv for i, t in zip(*b)])
    k_explicit = f.T @ f / len(f)
    k_sketch = sh.curvature.eigvecs.double() @ torch.diag(sh.curvature.eigvals.double()) @ sh.curvature.eigvecs.double().T
    torch.testing.assert_close(k_sketch, k_explicit, rtol=1e-4, atol=1e-4 * float(k_explicit.abs().max()))
    torch.testing.assert_close(sh.projected["target"].double(), proj.project_weights(st.v).double(), rtol=1e-4,
                               atol=1e-6)
    torch.testing.assert_close(sh.projected["train"].double(), proj.project_weights(st.G).double(), rtol=1e-4,
                               atol=1e-6)
    g = torch.Generator().manual_seed(0)
    w = {"target": torch.randn(proj.k, generator=g, dtype=torch.float64),
         "train": torch.randn(proj.k, generator=g, dtype=torch.float64)}
    images, tokens = pairs[0][0][:5], pairs[0][1][:5]
    comp, _ = CheckpointScorer(st.engine, sh, targets=["target", "train", "self"], form="propagated",
                               prop_directions=w, prop_step=0.05, prop_weight=0.1)(images, tokens)
    exact = torch.stack([pg(i, t) for i, t in zip(images, tokens)])
    lam, vec = torch.linalg.eigh(sh.curvature.eigvecs.double() @ torch.diag(sh.curvature.eigvals.double())
                                 @ sh.curvature.eigvecs.double().T)
    phi_k = vec @ torch.diag(phi(0.05 * lam.clamp_min(0))) @ vec.T
    for name in ("target", "train"):
        np.testing.assert_allclose(comp[f"prop_{name}"], (exact @ w[name]).numpy(), rtol=1e-4,
                                   atol=1e-6 * float(exact.norm(dim=1).max() * w[name].norm()))
    np.testing.assert_allclose(comp["prop_self"], (0.1 * ((exact @ phi_k) * exact).sum(1)).numpy(), rtol=1e-4)
    assert not any(k.startswith(("t1_", "t2_")) for k in comp)


def test_t1_self_is_eigen_definition(t2_case):
    st, sh, images, tokens, _, grads, fd = t2_case
    comp = fd(1e-2)
    lams = sh.eigvals
    qs = [sh.vectors[f"q{j}"] for j in range(len(lams))]
    assert len(lams) == 2 and lams == sorted(lams)
    # orthonormal eigenvectors, Rayleigh quotients equal to the eigenvalues (exact HVP)
    for i, qi in enumerate(qs):
        for j, qj in enumerate(qs):
            assert abs(dot(qi, qj) - (i == j)) < 1e-4
        hq = hvp(st.ref_loss, st.params, qi)
        rq = dot(qi, hq)
        assert abs(rq - lams[i]) < 1e-2 * max(abs(x) for x in lams), (i, rq, lams)
        if abs(lams[i]) == max(abs(x) for x in lams):
            # the dominant pair has converged (4 subspace iterations): ||H q - lambda q|| / |lambda| small.
            # (The second pair need not have: its residual is reported, not asserted.)
            residual = norm({n: hq[n] - lams[i] * qi[n] for n in hq}) / abs(lams[i])
            assert residual < 0.1, (i, residual, lams)
    want = np.array([sum(lam * dot(q, g) ** 2 for lam, q in zip(lams, qs)) for g in grads])
    np.testing.assert_allclose(comp["t1_self"], want, rtol=1e-4)
    # diffin_self = I(z,z) = a (t1_self + t2_self), a < 0: self-influential samples are the most negative
    out = combine([comp], [0.5], [-2.0], [str(i) for i in range(len(grads))])
    np.testing.assert_allclose(out["diffin_self"], -2.0 * (comp["t1_self"] + comp["t2_self"]))


def test_t1_target_train_are_exact_dots(t2_case):
    st, sh, images, tokens, _, grads, fd = t2_case
    comp = fd(1e-2)
    for name, u in (("t1_target", sh.vectors["u_target"]), ("t1_train", sh.vectors["u_train"])):
        want = np.array([dot(u, g) for g in grads])
        np.testing.assert_allclose(comp[name], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# -- batched Diff-In and TracIn vs direct per-sample evaluation over two checkpoints ------------------------------
N_POOL, M_CKPT, UPDATES = 1000, 2, 3  # two checkpoints, 3 SGD updates each (two_checkpoints)


@pytest.fixture(scope="module")
def two_checkpoints(micro, pairs):
    """Checkpoints after 3 and 6 SGD steps (eta 0.1), and 20 scored pool samples."""
    pool, target = pairs
    model = copy.deepcopy(micro[0])
    ckpts = []
    for step in (3, 6):
        _sgd(model, *pool, steps=3, seed=step)
        ckpts.append((step, 0.1, Setting(copy.deepcopy(model), pool, target, ref=(300, 16, 16))))
    images, tokens = pool[0][:20], pool[1][:20]
    return ckpts, images, tokens


@pytest.fixture(scope="module")
def batched_scores(two_checkpoints):
    ckpts, images, tokens = two_checkpoints
    per, etas, a_ts = [], [], []
    for i, (step, eta, st) in enumerate(ckpts):
        a = diffin_coefficient(step, eta, UPDATES, N_POOL)
        sh = st.shared(["target", "train"], index=i, step=step, eta=eta, a_t=a)
        scorer = CheckpointScorer(st.engine, sh, targets=["target", "train"], base_pass="exact", form="taylor")
        parts = [scorer(images[j:j + 8], tokens[j:j + 8])[0] for j in range(0, 20, 8)]
        per.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        etas.append(eta)
        a_ts.append(a)
    return combine(per, etas, a_ts, [f"s{i}" for i in range(20)]), per


@pytest.fixture(scope="module")
def batched_exact_increment(two_checkpoints):
    """Diff-In's exact_increment form (one pass, no finite differences) through CheckpointScorer and combine."""
    ckpts, images, tokens = two_checkpoints
    per, etas, a_ts, b_ts = [], [], [], []
    for i, (step, eta, st) in enumerate(ckpts):
        a = diffin_coefficient(step, eta, UPDATES, N_POOL)
        sh = st.shared(["target", "train"], index=i, step=step, eta=eta, a_t=a)
        scorer = CheckpointScorer(st.engine, sh, targets=["target", "train"], form="exact_increment")
        parts = [scorer(images[j:j + 8], tokens[j:j + 8])[0] for j in range(0, 20, 8)]
        per.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        etas.append(eta)
        a_ts.append(a)
        b_ts.append(first_order_coefficient(eta, UPDATES, N_POOL))
    return combine(per, etas, a_ts, [f"s{i}" for i in range(20)], b_ts=b_ts), per


@pytest.fixture(scope="module")
def direct_scores(two_checkpoints):
    """The formulas evaluated sample by sample with exact autograd gradients and double-backward HVPs."""
    ckpts, images, tokens = two_checkpoints
    out = {k: np.zeros(20) for k in ("diffin_target", "diffin_train", "tracin_target", "tracin_pred", "tracin_self",
                                     "exact_increment_target", "exact_increment_train")}
    per = []
    for step, eta, st in ckpts:
        a, b_t = -step * eta ** 2 * UPDATES / N_POOL, eta * UPDATES / N_POOL
        comp = {k: np.zeros(20) for k in ("tracin_target", "tracin_pred", "sq_norm", "loss")}
        for b in range(20):
            g = st.sample_grad(images[b], tokens[b])
            hb_g = hvp(st.ref_loss, st.params, g)  # H_B g_z
            hz_G = hvp(lambda: st.sample_loss(images[b], tokens[b]), st.params, st.G)  # H_z G_B
            bracket = {n: hb_g[n] + hz_G[n] for n in g}
            out["diffin_target"][b] += a * dot(st.v, bracket)
            out["diffin_train"][b] += a * dot(st.G, bracket)
            out["exact_increment_target"][b] += b_t * dot(st.v, g) + a * dot(st.v, hb_g)
            out["exact_increment_train"][b] += b_t * dot(st.G, g) + a * dot(st.G, hb_g)
            comp["tracin_target"][b] = dot(g, st.v)
            comp["tracin_pred"][b] = dot(g, st.v_pred)
            comp["sq_norm"][b] = dot(g, g)
            with torch.no_grad():
                comp["loss"][b] = float(st.sample_loss(images[b], tokens[b]))
        out["tracin_target"] += eta * comp["tracin_target"]
        out["tracin_pred"] += eta * comp["tracin_pred"]
        out["tracin_self"] -= eta * comp["sq_norm"]
        per.append(comp)
    return out, per


@pytest.mark.parametrize("score", ["diffin_target", "diffin_train"])
def test_batched_diffin_equals_direct(batched_scores, direct_scores, score):
    got, want = batched_scores[0][score], direct_scores[0][score]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    worst = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel < 2e-2 and worst < 2e-2, (score, rel, worst, got, want)
    assert np.all(np.sign(got) == np.sign(want)) or worst < 1e-3


@pytest.mark.parametrize("target", ["target", "train"])
def test_batched_exact_increment_equals_direct(batched_exact_increment, direct_scores, target):
    """sum_t b_t <v, g_z> + a_t <v, H_B g_z> against exact gradients and double backward; the only approximation
    left is u = H_B v by central differences (shared): within 1e-2 relative per sample, or 1e-3 of the largest
    score (measured: at most 7e-3 relative, 2e-4 of the largest, on the train target)."""
    (got, per), want = batched_exact_increment, direct_scores[0][f"exact_increment_{target}"]
    np.testing.assert_allclose(got[f"diffin_{target}"], want, rtol=1e-2, atol=1e-3 * np.abs(want).max())
    assert not any(k.startswith("t2_") for k in per[0]), "the exact_increment form has no finite-difference term"


def test_tracin_equals_explicit_dots(batched_scores, direct_scores):
    (got, per_got), (want, per_want) = batched_scores, direct_scores
    for i in range(M_CKPT):
        for k in ("tracin_target", "tracin_pred", "sq_norm", "loss"):
            np.testing.assert_allclose(per_got[i][k], per_want[i][k], rtol=1e-4, err_msg=f"ckpt {i} {k}")
    for k in ("tracin_target", "tracin_pred", "tracin_self"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, err_msg=k)
    # eta-weighted sums of the per-checkpoint columns, and the audit columns are kept
    np.testing.assert_allclose(got["tracin_target"], 0.1 * (got["c0_tracin_target"] + got["c1_tracin_target"]))
    np.testing.assert_allclose(got["tracin_self"], -0.1 * (got["c0_sq_norm"] + got["c1_sq_norm"]))
    np.testing.assert_allclose(got["oga_l2"], -np.sqrt(per_got[-1]["sq_norm"]))
    np.testing.assert_allclose(got["baseline_loss"], -per_got[-1]["loss"])


# -- signs on a constructed case -----------------------------------------------------------------------------------
N_CLEAN, N_SWAPPED, SIGN_STEPS, SIGN_LR = 40, 10, 100, 2e-3
SQUARE_COLOURS = {"red": (220, 30, 30), "blue": (40, 60, 220)}


def _colour_squares(n, seed):
    """``n`` constructed pairs [(image PIL 32x32, caption, label, colour)]: a noisy square of a class colour
    (side 10-19 px, anywhere) on a noisy grey background, captioned "a photo of a <colour> square.", classes in
    turn. Every caption of a class is the same text, so in the image-to-text half of the loss the bank's same-class
    entry only repeats the positive logit (about a constant log 2) instead of asking the model to tell two
    captions of one class apart."""
    rng = np.random.default_rng(seed)
    names = list(SQUARE_COLOURS)
    out = []
    for i in range(n):
        colour = names[i % len(names)]
        img = rng.normal(128, 20, (32, 32, 3))
        side = rng.integers(10, 20)
        x, y = rng.integers(0, 32 - side, 2)
        img[y:y + side, x:x + side] = np.array(SQUARE_COLOURS[colour]) + rng.normal(0, 15, (side, side, 3))
        out.append((Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), f"a photo of a {colour} square.",
                    i % len(names), colour))
    return out


def _adamw_train(model, images, tokens, steps, lr, batch=32, warmup=8, save_at=()):
    """AdamW (no weight decay) on the in-batch CLIP loss with a learnable temperature, linear warm-up, gradient
    clipping at 1; returns [(step, eta, eval-mode copy)] at the ``save_at`` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    saved = []
    for step in range(1, steps + 1):
        model.train()
        eta = lr * min(1.0, step / warmup)
        for group in opt.param_groups:
            group["lr"] = eta
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        img, txt = encode_pairs(model, images[idx], tokens[idx])
        logits = model.logit_scale.exp() * img @ txt.T
        labels = torch.arange(batch)
        loss = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                      + torch.nn.functional.cross_entropy(logits.T, labels))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step in save_at:
            ckpt = copy.deepcopy(model).eval()
            for p in ckpt.parameters():
                p.grad = None
            saved.append((step, eta, ckpt))
    return saved


@pytest.fixture(scope="module")
def sign_case(micro):
    """pruner-micro trained with AdamW (100 steps, lr 2e-3) on 512 constructed red/blue square pairs
    (``_colour_squares``); 40 clean held-out pairs and 10 whose caption names the other colour, scored (TracIn
    target, Diff-In target) against a clean target set of 96 pairs at two checkpoints (steps 50 and 100), with a
    bank of one pair per class. Diff-In in both forms (pruner.scores.combine).

    Why this case and not the demo's CIFAR pairs: on those, pruner-micro learns little in a test's budget
    (zero-shot 0.19-0.33 after up to 1200 steps, image embeddings nearly collapsed) and the bank holds
    near-duplicates of every class, so a step on any pair mainly separates it from the bank and lowers the target
    loss: the measured first-order effect of a swapped pair was positive and the premise of the test did not
    hold. Here the model learns the task (zero-shot 1.0) and the measured first-order effect of each swapped pair
    is negative (``test_tracin_matches_measured_first_order_effect`` checks TracIn against it).

    Measured (CPU, about 8 s; seeds 0-3 of data, init and sampling, and 2 or 3 colours all alike):
    tracin_target: every swapped pair negative and below the clean median, every clean pair positive.
    Diff-In, exact_increment form (the default): the same as TracIn: every swapped pair negative and below the
    clean median, every clean pair positive (the damping a_t <H_B v, g_z> is ~1e-4 of the first-order part).
    Diff-In, taylor form (the paper's): every clean pair negative; the swapped pairs of one direction (red images
    captioned blue) positive, of the other slightly negative, none clearly below the clean median (seed 0 of the
    data here; other seeds and 3 colours: 0-4/10 negative). Why, from the per-checkpoint components: the taylor
    form keeps only second-order terms (methods.md 1.2 drops the first-order offset), and with AdamW they are
    ~1e-4 of the first-order effect eta_t/N <v_t, g_z>: the drift term a_t <v, H_z G_B> assumes plain-SGD steps
    eta G_B, while Adam's steps are eta times a normalised direction. Replacing G_B by the actual displacement
    (theta_0 - theta_t) / (t eta) makes the term ~0.1 of the first-order effect but with the wrong sign: the
    expansion <v, H_z (theta_t - theta_0)> is anti-correlated with the true change <v, g_z(theta_t) - g_z(theta_0)>
    (test_taylor_drift_misses_the_gradient_change). With plain SGD (lr 0.02-0.1, 24-400 steps, 2-8 colours) the
    taylor form's swapped pairs were 0-10/10 negative with no stable pattern (t eta ||H|| ~ 1-2, where the
    second-order truncation does not hold), and TracIn's stayed positive while the model learned."""
    _, preprocess, tokenizer = micro
    train, pool, target = _colour_squares(512, 1), _colour_squares(N_CLEAN + N_SWAPPED, 2), _colour_squares(96, 3)
    other = {c: [o for o in SQUARE_COLOURS if o != c][0] for c in SQUARE_COLOURS}
    captions = [s[1] for s in pool[:N_CLEAN]] + [s[1].replace(f" {s[3]} ", f" {other[s[3]]} ")
                                                 for s in pool[N_CLEAN:]]
    scored = _tensors(preprocess, tokenizer, pool, captions)
    rest = _tensors(preprocess, tokenizer, train)  # the training pool (the scored pairs are not in it)
    tgt = _tensors(preprocess, tokenizer, target)

    torch.manual_seed(0)
    model = linearize_clip(create_clip("pruner-micro")[0])
    init = copy.deepcopy(model).eval()
    ckpts = _adamw_train(model, *rest, steps=SIGN_STEPS, lr=SIGN_LR, save_at=(SIGN_STEPS // 2, SIGN_STEPS))
    per, per_exact, etas, a_ts, b_ts, states = [], [], [], [], [], []
    bank_batches = _batches(*rest, 0, len(SQUARE_COLOURS), len(SQUARE_COLOURS))
    for i, (step, eta, ckpt) in enumerate(ckpts):
        engine = PerSampleGradients(ckpt, k=256)
        a = diffin_coefficient(step, eta, SIGN_STEPS // 2, len(train))  # each checkpoint stands for S/2 updates
        sh = compute_shared(engine, index=i, step=step, eta=eta, a_t=a, bank_batches=bank_batches,
                            target_batches=_batches(*tgt, 0, len(target), len(target)),
                            reference_batches=_batches(*rest, 200, 64, 32), targets=["target"], hvp_eps=1e-2,
                            self_rank=0)
        per.append(CheckpointScorer(engine, sh, targets=["target"], form="taylor")(*scored)[0])
        per_exact.append(CheckpointScorer(engine, sh, targets=["target"], form="exact_increment")(*scored)[0])
        etas.append(eta)
        a_ts.append(a)
        b_ts.append(first_order_coefficient(eta, SIGN_STEPS // 2, len(train)))
        states.append((ckpt, engine, sh))
    uids = [f"z{i}" for i in range(len(pool))]
    out = combine(per, etas, a_ts, uids)
    out["diffin_target_exact_increment"] = combine(per_exact, etas, a_ts, uids, b_ts=b_ts)["diffin_target"]
    with torch.no_grad():
        img, txt = encode_pairs(ckpts[-1][2], tgt[0], tokenizer([f"a photo of a {c} square." for c in SQUARE_COLOURS]))
        zero_shot = float(((img @ txt.T).argmax(1) == torch.tensor([s[2] for s in target])).float().mean())
    return {"scores": out, "per": per, "a_t": a_ts, "b_t": b_ts, "steps": ckpts, "n_train": len(train), "scored": scored,
            "target": tgt, "states": states, "init": init, "bank_batches": bank_batches, "zero_shot": zero_shot}


def _describe(case, key):
    v = case["scores"][key]
    clean, sw = v[:N_CLEAN], v[N_CLEAN:]
    return (f"{key}: clean median {np.median(clean):.4g} (min {clean.min():.4g}, max {clean.max():.4g}); swapped "
            f"{np.array2string(sw, precision=4)}; model after {SIGN_STEPS} AdamW steps: target zero-shot accuracy "
            f"{case['zero_shot']:.3f}")


def test_swapped_caption_is_harmful_tracin(sign_case):
    """A pair whose caption names the other colour is harmful (negative TracIn) and ranks below every clean pair's
    median; the model has learned the task, so the premise holds."""
    assert sign_case["zero_shot"] >= 0.95, _describe(sign_case, "tracin_target")
    v = sign_case["scores"]["tracin_target"]
    clean, sw = v[:N_CLEAN], v[N_CLEAN:]
    assert np.all(sw < 0) and np.all(sw < np.median(clean)) and np.all(clean > 0), _describe(sign_case, "tracin_target")


def test_swapped_caption_is_harmful_diffin(sign_case):
    """Diff-In in its default form (exact_increment): every swapped pair negative and below the clean median, every
    clean pair positive."""
    key = "diffin_target_exact_increment"
    v = sign_case["scores"][key]
    clean, sw = v[:N_CLEAN], v[N_CLEAN:]
    assert np.all(sw < 0) and np.all(sw < np.median(clean)) and np.all(clean > 0), _describe(sign_case, key)


@pytest.mark.xfail(strict=True, reason=(
    "measured, issue 5: the taylor form (the paper's) keeps only second-order terms, ~1e-4 of the first-order "
    "effect on this AdamW trajectory (test_diffin_is_second_order_small_on_adamw), and its expansion of z's "
    "gradient around theta_0 gets the sign of the change wrong (test_taylor_drift_misses_the_gradient_change)"))
def test_swapped_caption_is_harmful_diffin_taylor(sign_case):
    v = sign_case["scores"]["diffin_target"]
    clean, sw = v[:N_CLEAN], v[N_CLEAN:]
    assert np.all(sw < 0) and np.all(sw < np.median(clean)), _describe(sign_case, "diffin_target")


def test_taylor_drift_misses_the_gradient_change(sign_case):
    """Why the taylor form fails here, pinned: its drift term stands for <v, g_z(theta_t) - g_z(theta_0)>
    ~ <v, H_z (theta_t - theta_0)>. Even with the actual displacement of this AdamW run in place of the SGD
    step -t eta G_B, that first-order expansion is anti-correlated with the true change over the scored pairs
    (measured Pearson -0.65 and -0.79 at steps 50 and 100; asserted < -0.5), so no choice of drift direction
    rescues it and the exact_increment form evaluates g_z(theta_t) itself instead. The true change is taken like
    for like: only the parameters the expansion moves are rewound, with the checkpoint's bank and temperature."""
    start = dict(sign_case["init"].named_parameters())
    for ckpt, engine, sh in sign_case["states"]:
        v, params = sh.vectors["v_target"], engine.params()
        # like for like: theta_0 on exactly the parameters the expansion moves (the scored Linear layers), every
        # other parameter, the bank and the temperature as at theta_t
        rewound = copy.deepcopy(ckpt)
        engine0 = PerSampleGradients(rewound, k=256)
        with torch.no_grad():
            for n, p in engine0.params().items():
                p.copy_(start[n])
        loss = lambda i, t: bank_loss(i, t, sh.bank_img, sh.bank_txt, sh.scale)  # noqa: E731
        at0 = engine0.run(*sign_case["scored"], loss, directions=engine0.directions([v]), features=False,
                          norms=False, reduce=False)
        now = CheckpointScorer(engine, sh, targets=[], form="exact_increment")(*sign_case["scored"])[0]
        change = now["tracin_target"] - at0.dots[:, 0].double().numpy()
        displacement = {n: (params[n] - start[n]).detach() for n in params}
        drift = dataclasses.replace(sh, vectors={**sh.vectors, "G": displacement})
        taylor = CheckpointScorer(engine, drift, targets=["target"], form="taylor")(*sign_case["scored"])[0]
        rho = np.corrcoef(taylor["t2_target"], change)[0, 1]  # <v, H_z (theta_t - theta_0)> vs the true change
        print(f"step {sh.step}: Pearson(taylor drift, true change) = {rho:.3f}")
        assert rho < -0.5, (sh.step, rho)


def test_diffin_is_second_order_small_on_adamw(sign_case):
    """The reason behind the Diff-In xfail, pinned so a change to it is noticed: at each checkpoint and for every
    scored pair, Diff-In's part a_t (T1 + T2) is under 1e-3 of the first-order effect b_t <v_t, g_z> (b_t = eta_t
    Delta_t / N, over the same updates as a_t) that methods.md 1.2 leaves out (measured ~1e-4 on this AdamW
    trajectory)."""
    for per, a, b, (step, _, _) in zip(sign_case["per"], sign_case["a_t"], sign_case["b_t"], sign_case["steps"]):
        second = np.abs(a * (per["t1_target"] + per["t2_target"]))
        first = np.abs(b * per["tracin_target"])
        assert np.all(second < 1e-3 * first), (step, np.max(second / first))


def test_tracin_matches_measured_first_order_effect(sign_case):
    """Ground truth for the sign convention: TracIn target at a checkpoint is the first-order change of the target
    loss under a gradient step on z, measured here by central differences of the target loss along -g_z
    (positive = the step lowers the target loss = helpful)."""
    ckpt, engine, sh = sign_case["states"][-1]
    images, tokens = sign_case["scored"]
    t_img, t_tok = sign_case["target"]
    params = engine.params()

    def target_loss():
        with torch.no_grad():
            img, txt = encode_pairs(ckpt, t_img, t_tok)
            return float(bank_loss(img, txt, sh.bank_img, sh.bank_txt, sh.scale).mean())

    measured = []
    for b in range(images.shape[0]):
        img, txt = encode_pairs(ckpt, images[b:b + 1], tokens[b:b + 1])
        g = _grad(params, bank_loss(img, txt, sh.bank_img, sh.bank_txt, sh.scale).sum())
        h = 1e-2 / norm(g)
        saved = {n: p.detach().clone() for n, p in params.items()}
        vals = []
        for sign in (-1.0, 1.0):
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(g[n], alpha=sign * h)
            vals.append(target_loss())
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
        measured.append((vals[1] - vals[0]) / (2 * h))  # = -d/dstep L_V(theta - step * g_z) at step 0
    measured = np.array(measured)
    tracin = sign_case["per"][-1]["tracin_target"]
    np.testing.assert_allclose(tracin, measured, rtol=2e-2, atol=2e-3 * np.abs(measured).max())
    assert np.array_equal(np.sign(tracin), np.sign(measured))


# -- OGA and hash_unit ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oga_features(random_setting, pairs):
    st = random_setting
    images, tokens = pairs[0][0][:48], pairs[0][1][:48]
    loss_fn = lambda i, t: bank_loss(i, t, *st.bank, st.scale)
    return st.engine.run(images, tokens, loss_fn, norms=False).features.numpy()


def test_iforest_deterministic(oga_features):
    a = iforest_scores(fit_isolation_forest(oga_features, seed=3), oga_features)
    b = iforest_scores(fit_isolation_forest(oga_features, seed=3), oga_features)
    c = iforest_scores(fit_isolation_forest(oga_features, seed=4), oga_features)
    assert a.dtype == np.float64 and a.shape == (len(oga_features),)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # float64 input is scored like its float32 cast
    assert np.array_equal(a, iforest_scores(fit_isolation_forest(oga_features.astype(np.float64), seed=3),
                                            oga_features.astype(np.float64)))
    with pytest.raises(ValueError):
        fit_isolation_forest(oga_features[:1])


def test_iforest_outlier_scores_lowest(oga_features):
    feats = oga_features.copy()
    feats[17] *= 25.0  # a sample whose gradient is 25x larger than it was
    forest = fit_isolation_forest(feats, seed=0)
    scores = iforest_scores(forest, feats)
    assert int(np.argmin(scores)) == 17
    assert scores[17] < np.partition(scores, 1)[1]
    # and the same outlier scored by a forest fitted without it (subsample fit, then score everything)
    forest = fit_isolation_forest(np.delete(feats, 17, axis=0), seed=0)
    assert int(np.argmin(iforest_scores(forest, feats))) == 17


def test_hash_unit():
    vals = [f"uid-{i}" for i in range(2000)]
    a = hash_unit(vals, "random-0")
    assert a.dtype == np.float64 and a.shape == (2000,)
    assert np.array_equal(a, hash_unit(vals, "random-0"))
    assert np.all((a >= 0) & (a < 1))
    assert np.array_equal(hash_unit(vals[::-1], "random-0"), a[::-1])  # per value, independent of order
    assert not np.array_equal(a, hash_unit(vals, "random-1"))
    assert 0.45 < a.mean() < 0.55
    want = int.from_bytes(hashlib.sha1(b"s:x").digest()[:8], "little") / 2.0 ** 64
    assert hash_unit(["x"], "s")[0] == want
    out = combine([{"sq_norm": np.ones(3), "l1_feat": np.ones(3), "loss": np.ones(3), "clip_score": np.ones(3)}],
                  [1.0], [1.0], ["a", "b", "c"], seed=7)
    assert np.array_equal(out["baseline_random"], hash_unit(["a", "b", "c"], "random-7"))


# -- a bank member's own pair is not its negative -----------------------------------------------------------------
def test_bank_member_own_pair_is_masked(trained_setting):
    """The bank is drawn from the pool, so some scored pairs are bank members. Scoring such a pair with its uid must
    equal scoring it alone against the bank without its row (brute force: the row deleted), for the loss, every dot
    component and the features; and must differ from the unmasked loss, where its own pair is its hardest
    negative. Tolerance: rtol 1e-6 (fp32 backward; the masked and the deleted column sum in a different order)."""
    st = trained_setting
    sh = st.shared(["target", "train"])
    members = [0, 5, 17]  # bank rows 0, 5, 17 = the first bank batch's pairs 0, 5, 17
    images, tokens = st.bank_batches[0]
    images, tokens = images[members], tokens[members]
    sh.bank_uids = tuple(f"b{j}" for j in range(sh.bank_img.shape[0]))
    masked, f_masked, _ = CheckpointScorer(st.engine, sh).compute(images, tokens, [f"b{j}" for j in members])
    parts = []
    for i, j in enumerate(members):  # each pair alone, against the bank without its own row
        keep = [r for r in range(sh.bank_img.shape[0]) if r != j]
        without = dataclasses.replace(sh, bank_img=sh.bank_img[keep], bank_txt=sh.bank_txt[keep], bank_uids=())
        parts.append(CheckpointScorer(st.engine, without).compute(images[i:i + 1], tokens[i:i + 1]))
    deleted = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    f_deleted = np.concatenate([p[1] for p in parts])
    unmasked, _, _ = CheckpointScorer(st.engine, sh).compute(images, tokens, ["not-in-bank"] * len(members))
    for name in ("loss", "tracin_target", "tracin_train", "t1_target", "t1_train", "sq_norm"):
        np.testing.assert_allclose(masked[name], deleted[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(f_masked, f_deleted, rtol=1e-5, atol=1e-6 * np.abs(f_deleted).max())
    assert np.all(unmasked["loss"] > masked["loss"] + 1e-3)  # the own pair in the softmax only adds to the loss
    own = sh.own_rows(["b5", "x", "b0"])
    assert own.tolist() == [5, -1, 0]
