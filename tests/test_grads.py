"""The per-sample gradient engine (pruner.grads.engine) and its projections (pruner.grads.project) against the
brute-force torch.func references in tests/reference.py, on pruner-micro at 32 px.

Two models: random weights, and the same model after a few SGD steps of the in-batch CLIP loss (so the per-sample
gradients are those of a model that has started to fit, with a trained logit scale).
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import small_job_config
from reference import demo_pairs, encode_pairs_functional, per_sample_grads, sgd_trained
from torch.func import grad, vmap

from pruner.config import load_config
from pruner.grads.engine import PerSampleGradients, drop_trailing_zero_tokens, select_layers, weight_gradient_terms
from pruner.grads.project import FactorizedProjector, find_single_token_layers, random_matrix
from pruner.model.checkpoints import load_trajectory
from pruner.model.clip import create_clip, linear_layers, linearize_clip
from pruner.model.loss import bank_loss, encode_pairs, in_batch_detached_loss, logit_scale_of
from pruner.scorer import Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- data and models -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model, preprocess, tokenizer = create_clip("pruner-micro")
    return linearize_clip(model).eval(), preprocess, tokenizer


@pytest.fixture(scope="module")
def data(micro):
    """160 pairs: real demo pairs when available (else random images with distinct captions)."""
    _, preprocess, tokenizer = micro
    pairs = demo_pairs(preprocess, tokenizer, 160)
    if pairs is None:
        g = torch.Generator().manual_seed(1)
        pairs = (torch.randn(160, 3, 32, 32, generator=g),
                 tokenizer([f"a photo of object {i} with colour {i * 7 % 13}" for i in range(160)]))
    return pairs


@pytest.fixture(scope="module", params=["random", "sgd"])
def model(request, micro, data):
    base = micro[0]
    if request.param == "random":
        return base
    # train on the tail of the data so the scored samples (the head) are not the training batches
    return sgd_trained(base, data[0][96:], data[1][96:])


def _bank(model, data, n: int = 48):
    with torch.no_grad():
        return encode_pairs(model, data[0][-n:], data[1][-n:])


def _loss_fn(model, data):
    bank_img, bank_txt = _bank(model, data)
    scale = logit_scale_of(model)
    return lambda i, t: bank_loss(i, t, bank_img, bank_txt, scale)


def _flat(grads: dict, names) -> torch.Tensor:
    return torch.cat([grads[n].double().flatten(1) for n in names], 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# -- exactness against torch.func -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exact(model, data):
    """Engine results and torch.func per-sample gradients for 8 samples, with three directions:
    the mean per-sample gradient, one sample's gradient, and a random vector."""
    images, tokens = data[0][:8], data[1][:8]
    loss_fn = _loss_fn(model, data)
    eng = PerSampleGradients(model, k=1024)
    names = list(eng.params())
    ref = per_sample_grads(model, set(names), images, tokens, loss_fn)
    g = torch.Generator().manual_seed(3)
    vectors = [{n: ref[n].mean(0) for n in names}, {n: ref[n][5].clone() for n in names},
               {n: torch.randn(p.shape, generator=g) for n, p in eng.params().items()}]
    res = eng.run(images, tokens, loss_fn, directions=eng.directions(vectors))
    return eng, names, ref, vectors, res, images, tokens, loss_fn


def test_features_equal_projected_exact_gradients(exact):
    eng, names, ref, _, res, *_ = exact
    want = eng.projector.project_weights(ref)
    assert res.features.shape == want.shape == (8, 1024)
    assert res.features.dtype == torch.float32
    assert _rel(res.features, want) < 1e-4
    per_sample = (res.features - want).double().norm(dim=1) / want.double().norm(dim=1)
    assert float(per_sample.max()) < 1e-4, per_sample


def test_exact_squared_norms(exact):
    _, names, ref, _, res, *_ = exact
    want = _flat(ref, names).square().sum(1)
    assert res.sq_norm.dtype == torch.float64
    rel = (res.sq_norm - want).abs() / want
    assert float(rel.max()) < 1e-4, rel


def test_directional_dots(exact):
    _, names, ref, vectors, res, *_ = exact
    flat = _flat(ref, names)
    assert res.dots.shape == (8, 3)
    for j, v in enumerate(vectors):
        want = flat @ torch.cat([v[n].double().flatten() for n in names])
        err = (res.dots[:, j] - want).abs()
        assert float(err.max() / want.abs().max()) < 1e-4, (j, err, want)
        if j < 2:  # structured directions: every dot is far from zero, so check each sample
            assert float((err / want.abs()).max()) < 1e-4, (j, err, want)
    # the direction that is sample 5's own gradient gives its squared norm
    assert abs(float(res.dots[5, 1] / res.sq_norm[5]) - 1) < 1e-4


def test_loss_and_embeddings(exact, model):
    _, _, _, _, res, images, tokens, loss_fn = exact
    with torch.no_grad():
        img, txt = encode_pairs(model, images, tokens)
        want = loss_fn(img, txt)
    torch.testing.assert_close(res.loss, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(res.img_emb, img.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.txt_emb, txt.float(), rtol=0, atol=1e-6)


def test_run_leaves_model_untouched(model, data):
    """The pass switches requires_grad off and adds hooks temporarily: both are restored, no .grad is formed."""
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    eng = PerSampleGradients(model, k=64)
    eng.run(data[0][:3], data[1][:3], _loss_fn(model, data))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_projected_inner_products_correlate_with_exact(model, data):
    """Pearson correlation of <P g_i, P g_j> with <g_i, g_j> over the 276 pairs i<j of 24 samples at k=1024 with
    the engine defaults (seed 0): >= 0.95 (issue 4). Measured 0.981 (random weights) and 0.967 (after SGD).

    Not a lucky seed: over projection seeds 0-4 the mean is >= 0.94 and the worst >= 0.90 (measured 0.976 / 0.962
    random, 0.952 / 0.922 after SGD). After SGD the per-sample gradients are nearly parallel (mean cosine 0.92) and
    the seed-to-seed spread is that of any 1024-dim random projection: a dense +-1 sketch of the whole gradient
    gives a mean of 0.956 and a worst of 0.914 over five seeds (benchmarks/projection_quality.py).
    Before the Khatri-Rao blocks for single-token layers (single_token_k=0: 16 x 16 Kronecker blocks for the rank-1
    gradients of the output projections and last blocks) seed 0 gave 0.922 / 0.563, seeds 0-4 a mean of 0.742
    and a worst of 0.563 after SGD."""
    n = 24
    images, tokens = data[0][:n], data[1][:n]
    loss_fn = _loss_fn(model, data)
    eng = PerSampleGradients(model, k=1024)
    names = list(eng.params())
    flat = _flat(per_sample_grads(model, set(names), images, tokens, loss_fn), names).detach()
    iu = torch.triu_indices(n, n, 1)
    exact_ip = (flat @ flat.T)[iu[0], iu[1]]
    assert exact_ip.numel() == 276

    def pearson(engine):
        feats = engine.run(images, tokens, loss_fn, norms=False).features.double()
        proj_ip = (feats @ feats.T)[iu[0], iu[1]]
        return float(torch.corrcoef(torch.stack([exact_ip, proj_ip]))[0, 1])

    assert eng.projector.single_token == {m for m in eng.layers if m in ("visual.proj", "text_projection")
                                          or ".resblocks.1." in m and m.endswith(("out_proj", "c_fc", "c_proj"))}
    r = pearson(eng)
    assert r >= 0.95, f"Pearson {r:.4f} < 0.95 (k=1024, layer_k={eng.projector.layer_k}, " \
                      f"single_token_k={eng.projector.single_token_k})"
    rs = [r] + [pearson(PerSampleGradients(model, k=1024, seed=s)) for s in range(1, 5)]
    assert sum(rs) / len(rs) >= 0.94 and min(rs) >= 0.90, rs


# -- batch invariance and determinism ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batched(micro, data):
    model = micro[0]
    images, tokens = data[0][:64], data[1][:64]
    loss_fn = _loss_fn(model, data)
    eng = PerSampleGradients(model, k=256)
    vec = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) for n, p in eng.params().items()}
    dirs = eng.directions([vec])

    def run(bs):
        parts = [eng.run(images[i:i + bs], tokens[i:i + bs], loss_fn, directions=dirs) for i in range(0, 64, bs)]
        return {k: torch.cat([getattr(p, k) for p in parts]) for k in ("features", "sq_norm", "dots", "loss")}

    return run


def test_batch_size_invariance(batched):
    results = {bs: batched(bs) for bs in (64, 7, 1)}
    ref = results[64]
    for bs in (7, 1):
        r = results[bs]
        per_sample = (r["features"] - ref["features"]).norm(dim=1) / ref["features"].norm(dim=1)
        assert float(per_sample.max()) < 1e-5, (bs, float(per_sample.max()))
        assert float(((r["sq_norm"] - ref["sq_norm"]).abs() / ref["sq_norm"]).max()) < 1e-5
        assert float(((r["dots"] - ref["dots"]).abs() / ref["dots"].abs().max()).max()) < 1e-5
        assert float(((r["loss"] - ref["loss"]).abs() / ref["loss"].abs()).max()) < 1e-5


def test_bitwise_deterministic_on_cpu(batched):
    a, b = batched(7), batched(7)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- projection matrices -------------------------------------------------------------------------------------------
def test_projection_matrices_depend_only_on_seed_and_layer(micro):
    model = micro[0]
    a = PerSampleGradients(model, k=512, seed=7)
    # a second engine on a separately built model with a different layer selection (so other offsets and order)
    torch.manual_seed(123)
    other = linearize_clip(create_clip("pruner-micro")[0])
    b = PerSampleGradients(other, k=512, seed=7, include=["transformer.*", "visual.proj"])
    c = PerSampleGradients(model, k=512, seed=8)
    shared = [n for n in b.layers if n in a.layers]
    assert len(shared) >= 5
    for name in shared:
        for pa, pb in zip(a.projector.factors(name), b.projector.factors(name)):
            assert torch.equal(pa, pb), name
    a2 = PerSampleGradients(model, k=512, seed=7)
    assert torch.equal(a.projector.final(), a2.projector.final())
    for name in a.layers:
        for pa, pa2, pc in zip(a.projector.factors(name), a2.projector.factors(name), c.projector.factors(name)):
            assert torch.equal(pa, pa2)
            assert not torch.equal(pa, pc), name
    assert not torch.equal(a.projector.final(), c.projector.final())
    # a pure function of its arguments
    assert torch.equal(random_matrix(3, "x", 4, 9), random_matrix(3, "x", 4, 9))
    assert not torch.equal(random_matrix(3, "x", 4, 9), random_matrix(3, "y", 4, 9))
    assert not torch.equal(random_matrix(3, "x", 4, 9), random_matrix(4, "x", 4, 9))
    # does not consume or depend on the global RNG
    torch.manual_seed(0)
    m1 = random_matrix(1, "z", 5, 5)
    r1 = torch.rand(1)
    torch.manual_seed(0)
    torch.rand(3)
    assert torch.equal(random_matrix(1, "z", 5, 5), m1)
    torch.manual_seed(0)
    random_matrix(1, "z", 5, 5)
    assert torch.equal(torch.rand(1), r1)


def test_random_matrix_entries():
    r = random_matrix(0, "a", 16, 300, "rademacher")
    assert r.dtype == torch.float32 and r.shape == (16, 300)
    assert set(torch.unique(r * 4).tolist()) == {-1.0, 1.0}
    g = random_matrix(0, "a", 64, 2000, "gaussian")
    assert abs(float(g.mean())) < 0.01 and abs(float(g.var() * 64) - 1) < 0.02
    with pytest.raises(ValueError):
        random_matrix(0, "a", 2, 2, "sparse")


@pytest.mark.parametrize("kind,direct", [("rademacher", True), ("gaussian", True), ("rademacher", False)])
def test_sketches_preserve_inner_products_in_expectation(kind, direct):
    """E[M^T M] = I for one matrix, and E <P x, P y> = <x, y> for the full factorised + dense sketch, over 300
    seeds, with a 5-sigma (and 5 %) tolerance; Khatri-Rao blocks added straight into the output (``direct``, the
    default) or reduced by R with the rest."""
    acc = torch.zeros(24, 24, dtype=torch.float64)
    for s in range(300):
        m = random_matrix(s, "m", 6, 24, kind).double()
        acc += m.T @ m
    acc /= 300
    assert float((acc - torch.eye(24, dtype=torch.float64)).abs().max()) < 0.15

    # a, b: Kronecker blocks; c (with a bias), d: Khatri-Rao blocks
    layers = {"a": (40, 24, True), "b": (12, 64, False), "c": (8, 8, True), "d": (10, 6, False)}
    g = torch.Generator().manual_seed(0)
    x = {"a.weight": torch.randn(40, 24, generator=g), "a.bias": torch.randn(40, generator=g),
         "b.weight": torch.randn(12, 64, generator=g), "c.weight": torch.randn(8, 8, generator=g),
         "c.bias": torch.randn(8, generator=g), "d.weight": torch.randn(10, 6, generator=g)}
    y = {n: 0.6 * t + torch.randn(t.shape, generator=g) for n, t in x.items()}
    exact_xy = sum(float((x[n].double() * y[n].double()).sum()) for n in x)
    exact_xx = sum(float(x[n].double().square().sum()) for n in x)
    est_xy, est_xx = [], []
    for seed in range(300):
        proj = FactorizedProjector(layers, k=48, layer_k=6, seed=seed, kind=kind, single_token_k=12,
                                   single_token_layers=["c", "d"], single_token_direct=direct)
        assert (proj.concat_dim - proj.reduced_dim) == (48 if direct else 0)
        assert proj.single_token == {"c", "d"}
        px, py = proj.project_weights(x).double(), proj.project_weights(y).double()
        est_xy.append(float(px @ py))
        est_xx.append(float(px @ px))
    for est, want in ((est_xy, exact_xy), (est_xx, exact_xx)):
        t = torch.tensor(est, dtype=torch.float64)
        se = float(t.std() / math.sqrt(len(est)))
        assert abs(float(t.mean()) - want) < 5 * se, (kind, float(t.mean()), want, se)
        assert abs(float(t.mean()) / want - 1) < 0.05, (kind, float(t.mean()), want)


def test_projector_layout():
    proj = FactorizedProjector({"a": (40, 24, True), "b": (3, 64, False)}, k=10, layer_k=6)
    assert proj.single_token == set()  # no output projection or residual block among these names
    assert proj.offsets == {"a": (0, 6, 6), "b": (42, 3, 6)}
    assert proj.concat_dim == 42 + 18
    assert proj.final().shape == (10, 60)
    p_out, p_in = proj.factors("b")
    assert p_out.shape == (3, 3) and p_in.shape == (6, 64)
    # Khatri-Rao blocks: m entries, the bias folded into P_in's last column
    layers = {"a": (40, 24, True), "visual.proj": (3, 64, False), "c": (5, 7, True)}
    proj = FactorizedProjector(layers, k=10, layer_k=6, single_token_k=20, single_token_layers=["visual.proj", "c"])
    assert proj.offsets == {"a": (0, 6, 6), "visual.proj": (42, 20, 0), "c": (62, 20, 0)}
    assert proj.block_dims == {"a": 42, "visual.proj": 20, "c": 20} and proj.concat_dim == 82
    assert proj.reduced_dim == 82 and proj.final().shape == (10, 82)  # m > k: through R
    # m <= k (the default): every Khatri-Rao block adds into the same k columns after the reduced blocks
    direct = FactorizedProjector(layers, k=30, layer_k=6, single_token_k=20, single_token_layers=["visual.proj", "c"])
    assert direct.offsets == {"a": (0, 6, 6), "visual.proj": (42, 20, 0), "c": (42, 20, 0)}
    assert direct.reduced_dim == 42 and direct.concat_dim == 72 and direct.final().shape == (30, 42)
    via_r = FactorizedProjector(layers, k=30, layer_k=6, single_token_k=20, single_token_layers=["visual.proj", "c"],
                                single_token_direct=False)
    assert via_r.offsets == proj.offsets and via_r.reduced_dim == via_r.concat_dim == 82
    p_out, p_in = proj.factors("c")
    assert p_out.shape == (20, 5) and p_in.shape == (20, 8)
    assert set(torch.unique(p_in).tolist()) == {-1.0, 1.0}  # unit-variance Rademacher; P_out carries 1/sqrt(m)
    # the automatic rule picks visual.proj; single_token_k=0 turns Khatri-Rao blocks off
    auto = FactorizedProjector(layers, k=10, layer_k=6)
    assert auto.single_token == {"visual.proj"} and auto.single_token_k == 10  # default: min(k, 1024)
    assert FactorizedProjector(layers, k=2048).single_token_k == 1024
    assert FactorizedProjector(layers, k=10, layer_k=6, single_token_k=0).offsets["visual.proj"] == (42, 3, 6)
    # matrix_bytes() counts exactly the matrices the projector generates
    for name in layers:
        proj.factors(name)
    proj.final()
    assert proj.matrix_bytes() == sum(4 * t.numel() for t in proj._cache.values())
    with pytest.raises(ValueError):
        FactorizedProjector(layers, k=10, single_token_k=-1)


def test_single_token_layer_rule():
    """The automatic rule: both output projections, and the attention output projection and MLP of each tower's
    last residual block; patterns override it."""
    blocks = lambda tower, n: [f"{tower}resblocks.{i}.{l}" for i in range(n)  # noqa: E731
                               for l in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")]
    names = blocks("visual.transformer.", 12) + ["visual.proj"] + blocks("transformer.", 3) + ["text_projection"]
    want = [f"visual.transformer.resblocks.11.{l}" for l in ("attn.out_proj", "mlp.c_fc", "mlp.c_proj")] + [
        "visual.proj"] + [f"transformer.resblocks.2.{l}" for l in ("attn.out_proj", "mlp.c_fc", "mlp.c_proj")] + [
        "text_projection"]
    assert find_single_token_layers(names) == want
    assert find_single_token_layers(names, ["*proj*n"]) == ["text_projection"]
    assert find_single_token_layers(names, []) == []


def test_single_token_layers_are_those_with_one_token(micro, data):
    """On the real model the rule names exactly the layers whose captured output gradient has one non-zero token
    per sample (so their gradients are rank 1)."""
    model = micro[0]
    eng = PerSampleGradients(model, k=64)
    live = {}
    project = eng.projector.project_activations

    def spy(name, a, gy):
        live[name] = int((gy.abs().amax(-1) > 0).sum(1).max())
        return project(name, a, gy)

    eng.projector.project_activations = spy
    eng.run(data[0][:4], data[1][:4], _loss_fn(model, data), norms=False)
    assert set(live) == set(eng.layers)
    assert eng.projector.single_token == {n for n, t in live.items() if t == 1}
    assert len(eng.projector.single_token) == 8


@pytest.mark.parametrize("direct", [True, False])
def test_khatri_rao_activations_equal_projected_weights(direct):
    """project_activations (the engine's path) equals project_weights of sum_t gy_t a_t^T for Khatri-Rao layers:
    one token, several tokens with one non-zero output gradient (gathered), and several live tokens (warns, exact);
    blocks added straight into the output or reduced by R."""
    layers = {"p": (8, 12, False), "q": (20, 10, True), "r": (6, 5, True), "s": (9, 7, True)}
    proj = FactorizedProjector(layers, k=32, single_token_k=16, single_token_layers=["p", "q", "r"],
                               single_token_direct=direct)
    g = torch.Generator().manual_seed(0)
    b = 5
    a = {"p": torch.randn(b, 1, 12, generator=g), "q": torch.randn(b, 7, 10, generator=g),
         "r": torch.randn(b, 4, 5, generator=g)}
    a["s"] = torch.randn(b, 3, 7, generator=g)  # a Kronecker layer, always reduced by R
    gy = {"p": torch.randn(b, 1, 8, generator=g), "q": torch.randn(b, 7, 20, generator=g),
          "r": torch.randn(b, 4, 6, generator=g), "s": torch.randn(b, 3, 9, generator=g)}
    live = torch.zeros(b, 7)
    live[torch.arange(b - 1), torch.tensor([0, 3, 6, 2])] = 1  # the last sample has no live token
    gy["q"] = gy["q"] * live[..., None]
    concat = torch.zeros(b, proj.concat_dim)
    grads = {}
    with pytest.warns(UserWarning, match="layer r is sketched as single-token"):
        for name in layers:
            block = proj.project_activations(name, a[name], gy[name])
            assert block.shape == (b, proj.block_dims[name])
            proj.add_block(concat, name, block)
            grads[f"{name}.weight"] = torch.einsum("bto,bti->boi", gy[name], a[name])
            if layers[name][2]:
                grads[f"{name}.bias"] = gy[name].sum(1)
    assert _rel(proj.reduce(concat), proj.project_weights(grads)) < 1e-5


def test_khatri_rao_sketch_of_rank1_gradients_beats_kronecker():
    """Why single-token layers get a Khatri-Rao block: for rank-1 gradients u a^T the 16 x 16 Kronecker block's
    inner product is a product of two 16-dim estimates; a Khatri-Rao block of the same size (256) is ~2.6x less
    noisy (RMS relative error over 200 seeds: 0.25 against 0.65), and its error falls as 1/sqrt(m)."""
    g = torch.Generator().manual_seed(0)
    u, a = torch.randn(2, 1, 1, 96, generator=g), torch.randn(2, 1, 1, 128, generator=g)
    u[1] += u[0]
    a[1] += a[0]
    exact = float((u[0] * u[1]).sum() * (a[0] * a[1]).sum())
    errors = {}
    for label, st_k in (("kronecker", 0), ("khatri_rao", 256)):
        est = []
        for seed in range(200):
            proj = FactorizedProjector({"visual.proj": (96, 128, False)}, k=8, seed=seed, single_token_k=st_k)
            x, y = (proj.project_activations("visual.proj", a[i], u[i]).double() for i in (0, 1))
            assert x.shape == (1, 256)
            est.append(float((x * y).sum()))
        errors[label] = float(torch.tensor(est).sub(exact).square().mean().sqrt()) / abs(exact)
    assert errors["khatri_rao"] < errors["kronecker"] / 2, errors


def test_projection_matrix_memory_for_vit_b32():
    """ViT-B-32 (width 768 / 512, 12 + 12 blocks, output projections 768 -> 512 and 512 -> 512) at k = 1024: the
    projection matrices (factors, Khatri-Rao rows, R) stay well under 300 MB."""
    def tower(prefix, width, n):
        out = {}
        for i in range(n):
            p = f"{prefix}resblocks.{i}."
            out.update({p + "attn.in_proj": (3 * width, width, True), p + "attn.out_proj": (width, width, True),
                        p + "mlp.c_fc": (4 * width, width, True), p + "mlp.c_proj": (width, 4 * width, True)})
        return out
    layers = {**tower("visual.transformer.", 768, 12), "visual.proj": (512, 768, False),
              **tower("transformer.", 512, 12), "text_projection": (512, 512, False)}
    proj = FactorizedProjector(layers, k=1024)
    assert len(proj.single_token) == 8
    assert proj.matrix_bytes() < 250e6, proj.matrix_bytes()
    before = FactorizedProjector(layers, k=1024, single_token_k=0)
    assert before.matrix_bytes() < proj.matrix_bytes()


def test_features_config_projection_knobs():
    from pydantic import ValidationError

    from pruner.config import FeaturesConfig
    f = FeaturesConfig()
    assert f.single_token_k is None and f.single_token_layers is None  # the projector's defaults
    assert FeaturesConfig(single_token_k=0).single_token_k == 0
    assert FeaturesConfig(single_token_layers=["visual.proj", "*.mlp.*"]).single_token_layers == ["visual.proj",
                                                                                                   "*.mlp.*"]
    for bad in ({"single_token_k": -1}, {"single_token_layers": [""]}, {"single_token_layers": "visual.proj"}):
        with pytest.raises(ValidationError):
            FeaturesConfig(**bad)


# -- in-batch loss variant ----------------------------------------------------------------------------------------
def test_in_batch_variant_exact(model, data):
    """With in_batch_detached_loss the engine's per-sample gradients equal torch.func gradients of each sample's
    loss against the *same* detached in-batch negatives (the other pairs' embeddings as constants)."""
    b = 6
    images, tokens = data[0][:b], data[1][:b]
    scale = logit_scale_of(model)
    eng = PerSampleGradients(model, k=512)
    names = list(eng.params())
    with torch.no_grad():
        img_all, txt_all = encode_pairs(model, images, tokens)
    others = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, b)]) for i in range(b)])  # [b, b-1]
    neg_txt, neg_img = txt_all[others].double(), img_all[others].double()  # [b, b-1, e]
    params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}

    def one(p, image, tok, ntxt, nimg):
        img, txt = encode_pairs_functional(model, p, image[None], tok[None])
        img, txt = img.double()[0], txt.double()[0]
        pos = scale * (img * txt).sum()
        i2t = torch.cat([pos[None], scale * ntxt @ img])
        t2i = torch.cat([pos[None], scale * nimg @ txt])
        return 0.5 * (torch.logsumexp(i2t, 0) + torch.logsumexp(t2i, 0)) - pos

    ref = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(params, images, tokens, neg_txt, neg_img)
    loss_fn = lambda i, t: in_batch_detached_loss(i, t, scale)
    vec = {n: ref[n][2].clone() for n in names}
    res = eng.run(images, tokens, loss_fn, directions=eng.directions([vec]))
    assert _rel(res.features, eng.projector.project_weights(ref)) < 1e-4
    flat = _flat(ref, names)
    want_sq = flat.square().sum(1)
    assert float(((res.sq_norm - want_sq).abs() / want_sq).max()) < 1e-4
    want_dot = flat @ flat[2]
    assert float(((res.dots[:, 0] - want_dot).abs() / want_dot.abs().max()).max()) < 1e-4
    # and the loss values are the in-batch ones
    with torch.no_grad():
        torch.testing.assert_close(res.loss, in_batch_detached_loss(img_all, txt_all, scale), rtol=1e-6, atol=1e-9)


# -- layer selection -----------------------------------------------------------------------------------------------
def test_include_exclude_patterns(micro, data):
    model = micro[0]
    all_layers = linear_layers(model)
    vis = select_layers(model, include=["visual.*"])
    assert set(vis) == {n for n in all_layers if n.startswith("visual.")} and "visual.proj" in vis
    no_attn = select_layers(model, exclude=["*.attn.*"])
    assert set(no_attn) == {n for n in all_layers if ".attn." not in n}
    both = select_layers(model, include=["transformer.*", "text_projection"], exclude=["*.mlp.c_fc"])
    assert set(both) == {n for n in all_layers if (n.startswith("transformer.") or n == "text_projection")
                         and not n.endswith("mlp.c_fc")}
    assert list(both) == [n for n in all_layers if n in both]  # registration order
    with pytest.raises(ValueError, match="no linear layer"):
        select_layers(model, include=["nothing.*"])
    with pytest.raises(ValueError, match="no linear layer"):
        PerSampleGradients(model, include=["visual.*"], exclude=["visual.*"])

    # the engine over a subset is exact for that subset, and params() names exactly the chosen layers
    eng = PerSampleGradients(model, k=256, include=["visual.*"], exclude=["*.mlp.*"])
    names = list(eng.params())
    assert names and all(n.startswith("visual.") and ".mlp." not in n for n in names)
    assert set(names) == {f"{l}.{w}" for l in eng.layers for w in ("weight", "bias")
                          if getattr(eng.layers[l], w, None) is not None}
    images, tokens = data[0][:4], data[1][:4]
    loss_fn = _loss_fn(model, data)
    ref = per_sample_grads(model, set(names), images, tokens, loss_fn)
    res = eng.run(images, tokens, loss_fn)
    assert _rel(res.features, eng.projector.project_weights(ref)) < 1e-4
    want = _flat(ref, names).square().sum(1)
    assert float(((res.sq_norm - want) / want).abs().max()) < 1e-4


# -- reduced precision ---------------------------------------------------------------------------------------------
def _bf16_autocast_supported() -> bool:
    try:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        return out.dtype == torch.bfloat16
    except Exception:
        return False


@pytest.mark.skipif(not _bf16_autocast_supported(), reason="CPU autocast bf16 unsupported")
def test_bf16_autocast_correlates_with_fp32(micro, data):
    model = micro[0]
    images, tokens = data[0][:8], data[1][:8]
    loss_fn = _loss_fn(model, data)
    fp32 = PerSampleGradients(model, k=1024).run(images, tokens, loss_fn)
    bf16 = PerSampleGradients(model, k=1024, precision="bf16").run(images, tokens, loss_fn)
    assert bf16.features.dtype == torch.float32 and torch.isfinite(bf16.features).all()
    r = float(torch.corrcoef(torch.stack([fp32.features.flatten(), bf16.features.flatten()]))[0, 1])
    assert r >= 0.99, r
    r_norm = float(torch.corrcoef(torch.stack([fp32.sq_norm, bf16.sq_norm]))[0, 1])
    assert r_norm >= 0.99, r_norm
    # bf16 really ran: the values are close but not identical
    assert not torch.equal(fp32.features, bf16.features)


# -- per-sample weight-gradient terms (every branch against explicit dW_z) ---------------------------------------
@pytest.mark.parametrize("t, d_in, d_out, chunk_bytes", [
    (1, 6, 5, 64 << 20),    # single token: rank-1 closed forms
    (3, 20, 30, 64 << 20),  # norms alone: Gram trick (T (d_in + d_out) < d_in d_out); with directions: dW_z
    (9, 4, 5, 64 << 20),    # norms alone: dW_z is cheaper than the Gram trick
    (3, 20, 30, 4 * 600 * 2),  # two samples per chunk
])
def test_weight_gradient_terms_equal_explicit(t, d_in, d_out, chunk_bytes):
    """Norms and dots equal those of explicitly formed dW_z = sum_t gy_t a_t^T (float64 reference, rel 1e-5)."""
    g = torch.Generator().manual_seed(t)
    b, n = 7, 3
    a, gy = torch.randn(b, t, d_in, generator=g), torch.randn(b, t, d_out, generator=g)
    dirs = torch.randn(n, d_out * d_in, generator=g)
    dw = torch.einsum("bto,bti->boi", gy.double(), a.double()).flatten(1)
    want_sq, want_dots = dw.square().sum(1), dw @ dirs.double().T
    sq, dots = weight_gradient_terms(a, gy, dirs, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(sq, want_sq, rtol=1e-5, atol=0)
    torch.testing.assert_close(dots, want_dots, rtol=1e-5, atol=1e-5 * float(want_dots.abs().max()))
    sq_only, none = weight_gradient_terms(a, gy, None, chunk_bytes=chunk_bytes)
    assert none is None
    torch.testing.assert_close(sq_only, want_sq, rtol=1e-5, atol=0)
    assert weight_gradient_terms(a, gy, None, norms=False) == (None, None)


def test_trailing_zero_tokens_are_dropped_exactly():
    """Positions after the batch's last non-zero output gradient are cut (and only those)."""
    a, gy = torch.randn(4, 10, 3), torch.randn(4, 10, 2)
    gy[:, 6:] = 0
    gy[1, 5] = 0  # an interior zero in one sample stays
    a2, gy2 = drop_trailing_zero_tokens(a, gy)
    assert gy2.shape[1] == a2.shape[1] == 6
    assert torch.equal(a2, a[:, :6]) and torch.equal(gy2, gy[:, :6])
    a3, gy3 = drop_trailing_zero_tokens(a, torch.zeros_like(gy))
    assert gy3.shape[1] == 1


def test_job_config_reaches_the_projector(micro_trajectory, tmp_path):
    """features.single_token_k / single_token_layers / layer_k / k of a job config are the scoring engines'."""
    cfg = load_config(data=small_job_config(tmp_path, micro_trajectory, features={
        "k": 64, "layer_k": 4, "single_token_k": 32, "single_token_layers": ["visual.proj"]}))
    traj = load_trajectory(file=cfg.trajectory.file)
    proj = Scorer(cfg, traj).engines[0].projector
    assert (proj.k, proj.layer_k, proj.single_token_k) == (64, 4, 32)
    assert proj.single_token == {"visual.proj"}
