"""Brute-force references for the numerical tests: exact per-sample gradients with torch.func and exact
Hessian-vector products with double backward. Slow by design; tiny models only."""
from __future__ import annotations

import copy

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import functional_call, grad, vmap

from pruner.io.shards import DEMO_DIR, read_shard
from pruner.model.loss import clip_batch_loss, encode_pairs



def per_sample_grads(model, names, images, tokens, loss_of_emb):
    """Exact per-sample gradients {name: [B, *param.shape]} of loss_of_emb(img[1,e], txt[1,e]) -> [1]."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def one(p, image, tok):
        img, txt = encode_pairs_functional(model, p, image[None], tok[None])
        return loss_of_emb(img, txt).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params, images, tokens)


def encode_pairs_functional(model, params, images, tokens):
    """Unit-norm (img, txt) embeddings with ``params`` substituted into the model (torch.func)."""
    wrapped = {f"m.{k}": v for k, v in params.items()}
    img = functional_call(_Encoder(model, "image"), wrapped, (images,), strict=False)
    txt = functional_call(_Encoder(model, "text"), wrapped, (tokens,), strict=False)
    return img, txt


class _Encoder(torch.nn.Module):
    def __init__(self, model, which):
        super().__init__()
        self.m = model
        self.which = which

    def forward(self, x):
        f = self.m.encode_image if self.which == "image" else self.m.encode_text
        return torch.nn.functional.normalize(f(x), dim=-1)


def hvp(loss_fn, params: dict, vec: dict) -> dict:
    """Exact Hessian-vector product of the scalar loss_fn() w.r.t. params (dict of Parameters), by double backward."""
    names = list(vec)
    ps = [params[n] for n in names]
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        g = torch.autograd.grad(loss_fn(), ps, create_graph=True)
        gv = sum((gi * vec[n]).sum() for gi, n in zip(g, names))
        h = torch.autograd.grad(gv, ps)
    return {n: hi.detach() for n, hi in zip(names, h)}


def demo_pairs(preprocess, tokenizer, n: int):
    """(images [n, 3, H, W], tokens [n, context]) of the first n pairs of the bundled demo pool, or None when it
    holds fewer (or is absent)."""
    samples = []
    for shard in sorted((DEMO_DIR / "pool").glob("*.tar.gz")):
        samples += read_shard(str(shard))[0]
        if len(samples) >= n:
            break
    if len(samples) < n:
        return None
    samples = samples[:n]
    return torch.stack([preprocess(s.image) for s in samples]), tokenizer([s.caption for s in samples])


def sgd_trained(model, images, tokens, steps: int = 8, lr: float = 0.1):
    """A copy of the model after ``steps`` plain SGD steps of the in-batch CLIP loss (logit scale trained too)."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (32,), generator=g)
        img, txt = encode_pairs(m, images[idx], tokens[idx])
        loss = clip_batch_loss(img, txt, m.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return m.eval()
