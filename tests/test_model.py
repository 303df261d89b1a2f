"""linearize_clip (pruner.model.clip): the swapped model computes the original open_clip embeddings, the swap is
idempotent, and afterwards every weight matrix of both towers is an ``nn.Linear`` (so hooks see all of them)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruner.model.clip import (LinearSelfAttention, MatmulLinear, create_clip, encode_text, linear_layers,
                               linearize_clip)

ARCHS = ("pruner-micro", "pruner-tiny")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturbed_model(arch: str, seed: int = 0) -> tuple[nn.Module, object]:
    """A random model in eval mode whose parameters (biases included, which open_clip initialises to zero) are all
    jittered, so copying any tensor to the wrong place would show."""
    torch.manual_seed(seed)
    model, _, tokenizer = create_clip(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval(), tokenizer


def _inputs(model, tokenizer, n: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images = torch.randn(n, 3, *size, generator=g)
    captions = ["a photo of a cat.", "there is a truck in this picture.", "a blurry photo of a frog",
                "an airplane in the sky over a green field at noon", "x"][:n]
    return images, tokenizer(captions)


@torch.no_grad()
def _embed(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    """(original, linearised copy, images, tokens) for one architecture."""
    original, tokenizer = _perturbed_model(request.param)
    lin = linearize_clip(copy.deepcopy(original))
    images, tokens = _inputs(original, tokenizer)
    return request.param, original, lin, images, tokens


def test_embeddings_unchanged(pair):
    arch, original, lin, images, tokens = pair
    img0, txt0 = _embed(original, images, tokens)
    img1, txt1 = _embed(lin, images, tokens)
    assert img0.shape == img1.shape and txt0.shape == txt1.shape
    torch.testing.assert_close(img1, img0, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt1, txt0, atol=1e-5, rtol=0)
    # the embeddings are not trivially small (atol 1e-5 would otherwise be meaningless)
    assert img0.abs().max() > 1e-2 and txt0.abs().max() > 1e-2


def test_embeddings_unchanged_batch_of_one(pair):
    """Same check sample by sample (batch of one exercises other kernel paths of nn.MultiheadAttention)."""
    arch, original, lin, images, tokens = pair
    for b in range(2):
        img0, txt0 = _embed(original, images[b:b + 1], tokens[b:b + 1])
        img1, txt1 = _embed(lin, images[b:b + 1], tokens[b:b + 1])
        torch.testing.assert_close(img1, img0, atol=1e-5, rtol=0)
        torch.testing.assert_close(txt1, txt0, atol=1e-5, rtol=0)


@torch.no_grad()
def test_text_without_padding_matches_full_context(pair):
    """encode_text runs the causal text tower only up to the batch's last end-of-text token: the same embeddings as
    open_clip's full-context encode_text (original and linearised model; atol 1e-5, the GEMMs see fewer rows), for a
    batch and for each caption alone (each then cut to its own length)."""
    arch, original, lin, images, tokens = pair
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # there is padding to drop
    for model in (original, lin):
        torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens), atol=1e-5, rtol=0)
        for b in range(tokens.shape[0]):
            torch.testing.assert_close(encode_text(model, tokens[b:b + 1]), model.encode_text(tokens[b:b + 1]),
                                       atol=1e-5, rtol=0)


@torch.no_grad()
def test_text_keeps_full_context_when_padding_matters(pair):
    """Pooling other than at the end-of-text token (here the last position) reads the padding: the full context runs,
    bit for bit open_clip's encode_text."""
    arch, original, lin, images, tokens = pair
    model = copy.deepcopy(lin)
    model.text_pool_type = "last"
    assert torch.equal(encode_text(model, tokens), model.encode_text(tokens))


def test_parameters_preserved(pair):
    """Same number of parameter values; every untouched parameter keeps its name and value; the swapped ones hold
    the original weights (in_proj/out_proj, transposed output projections)."""
    arch, original, lin, _, _ = pair
    orig = dict(original.named_parameters())
    new = dict(lin.named_parameters())
    assert sum(p.numel() for p in orig.values()) == sum(p.numel() for p in new.values())
    renamed = {}
    for name in orig:
        if name.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            renamed[name] = name.replace("in_proj_weight", "in_proj.weight").replace("in_proj_bias", "in_proj.bias")
        elif name == "visual.proj":
            renamed[name] = "visual.proj.weight"
        elif name == "text_projection":
            renamed[name] = "text_projection.weight"
        else:
            renamed[name] = name
    assert sorted(renamed.values()) == sorted(new), "parameter names after linearisation"
    for old_name, new_name in renamed.items():
        want = orig[old_name].detach()
        if old_name in ("visual.proj", "text_projection"):
            want = want.T
        assert torch.equal(new[new_name].detach(), want), old_name
    assert torch.equal(lin.logit_scale, original.logit_scale)


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__ == "ResidualAttentionBlock"]


def test_every_weight_matrix_is_linear(pair):
    arch, original, lin, _, _ = pair
    assert not any(isinstance(m, nn.MultiheadAttention) for m in lin.modules())
    assert not any(isinstance(p, nn.Parameter) for p in (getattr(lin.visual, "proj", None),
                                                           getattr(lin, "text_projection", None)))
    layers = linear_layers(lin)
    blocks = _blocks(lin)
    n_blocks = len(lin.visual.transformer.resblocks) + len(lin.transformer.resblocks)
    assert len(blocks) == n_blocks > 0
    for blk in blocks:
        assert isinstance(blk.attn, LinearSelfAttention)
        for sub in (blk.attn.in_proj, blk.attn.out_proj, blk.mlp.c_fc, blk.mlp.c_proj):
            assert isinstance(sub, nn.Linear)
    assert isinstance(lin.visual.proj, MatmulLinear) and isinstance(lin.text_projection, nn.Linear)
    # names: 4 linear layers per block plus the two tower projections, nothing else
    names = set(layers)
    for tower, n in (("visual.transformer", len(lin.visual.transformer.resblocks)),
                     ("transformer", len(lin.transformer.resblocks))):
        for i in range(n):
            for leaf in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
                assert f"{tower}.resblocks.{i}.{leaf}" in names
    assert {"visual.proj", "text_projection"} <= names
    assert len(names) == 4 * n_blocks + 2
    # every remaining >=2-d parameter that is not inside a Linear is an embedding, positional table or the patch conv
    in_linear = {f"{ln}.weight" for ln in layers}
    for name, p in lin.named_parameters():
        if p.dim() >= 2 and name not in in_linear:
            assert name in {"visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
                            "positional_embedding"}, name


def test_idempotent(pair):
    arch, original, lin, images, tokens = pair
    before = {n: p.detach().clone() for n, p in lin.named_parameters()}
    types_before = [(n, type(m)) for n, m in lin.named_modules()]
    img0, txt0 = _embed(lin, images, tokens)
    again = linearize_clip(lin)
    assert again is lin
    assert [(n, type(m)) for n, m in lin.named_modules()] == types_before
    after = dict(lin.named_parameters())
    assert list(after) == list(before)
    for n in before:
        assert torch.equal(after[n].detach(), before[n]), n
    img1, txt1 = _embed(lin, images, tokens)
    assert torch.equal(img0, img1) and torch.equal(txt0, txt1)


def test_matmul_linear_serves_rmatmul():
    lin = MatmulLinear(6, 3, bias=False)
    x = torch.randn(4, 6)
    torch.testing.assert_close(x @ lin, x @ lin.weight.T)


def test_gradients_unchanged():
    """The swapped model is not only forward-equivalent: parameter gradients of a loss agree too."""
    original, tokenizer = _perturbed_model("pruner-micro", seed=3)
    lin = linearize_clip(copy.deepcopy(original))
    images, tokens = _inputs(original, tokenizer, n=4)

    def grads(model):
        model.zero_grad()
        img, txt = model.encode_image(images), model.encode_text(tokens)
        (img.square().sum() + (img @ txt.T).sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g0, g1 = grads(original), grads(lin)
    vis, txt = "visual.transformer.resblocks", "transformer.resblocks"
    pairs = [(f"{txt}.0.attn.in_proj_weight", f"{txt}.0.attn.in_proj.weight", False),
             (f"{vis}.1.attn.in_proj_bias", f"{vis}.1.attn.in_proj.bias", False),
             (f"{vis}.0.attn.out_proj.weight", f"{vis}.0.attn.out_proj.weight", False),
             ("visual.proj", "visual.proj.weight", True), ("text_projection", "text_projection.weight", True),
             ("visual.conv1.weight", "visual.conv1.weight", False),
             ("token_embedding.weight", "token_embedding.weight", False)]
    for a, b, transpose in pairs:
        want = g0[a].T if transpose else g0[a]
        torch.testing.assert_close(g1[b], want, atol=1e-5, rtol=1e-4, msg=lambda m, a=a: f"{a}: {m}")


def test_dtype_and_device_kept():
    torch.manual_seed(0)
    model, _, tokenizer = create_clip("pruner-micro")
    model = model.double().eval()
    ref = copy.deepcopy(model)
    linearize_clip(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    images, tokens = _inputs(model, tokenizer, n=2)
    img0, txt0 = _embed(ref, images.double(), tokens)
    img1, txt1 = _embed(model, images.double(), tokens)
    torch.testing.assert_close(img1, img0, atol=1e-10, rtol=0)
    torch.testing.assert_close(txt1, txt0, atol=1e-10, rtol=0)


@pytest.mark.parametrize("arch", ["pruner-micro", "pruner-tiny"])
def test_open_clip_state_inverts_the_linearisation(arch):
    """open_clip_state(linearize_clip(m)) is m's own state dict, names and layouts (the attention in_proj and the
    output projections swapped back), bit for bit: what `pruner rescore --write-update` saves."""
    from pruner.model.clip import open_clip_state
    torch.manual_seed(0)
    model, _, _ = create_clip(arch)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    state = open_clip_state(linearize_clip(model))
    assert set(state) == set(ref)
    assert all(torch.equal(state[k], ref[k]) for k in ref)
