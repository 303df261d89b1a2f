"""Brute-force references for the numerical tests: exact per-sample gradients with torch.func and exact
Hessian-vector products with double backward. Slow by design; tiny models only."""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import functional_call, grad, vmap



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
