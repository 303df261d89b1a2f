"""Per-sample CLIP losses. The one place that defines what "a sample's loss" means in pruner.

Default (``bank``): the symmetric InfoNCE loss of pair z = (image x, text y) against a frozen negative bank of
K reference pairs whose embeddings were computed once per checkpoint and detached::

    l_z = 1/2 [ LSE(s<x,y>, s<x,Y_1..K>) - s<x,y> ]  +  1/2 [ LSE(s<y,x>, s<y,X_1..K>) - s<x,y> ]

with unit-norm embeddings and s = exp(logit_scale) of the checkpoint (treated as a constant). The positive
is part of the softmax denominator. The bank is drawn from the pool being scored, so a bank member meets its own
pair among the negatives; that column is masked (``own``), otherwise the pair would be its own hardest negative
(its loss pushed towards log 2 and its gradient distorted) for the K bank members only. Because the bank is
detached, d(sum_z l_z)/d(activations of z) depends only on z, so one backward of the summed loss gives every
per-sample gradient without cross-talk, and a sample's loss and gradient do not depend on its batch, shard or
worker.

The similarity / log-sum-exp head runs in float64 (cheap), which keeps finite differences of losses clean.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pruner.model.clip import encode_text


def bank_loss(img: torch.Tensor, txt: torch.Tensor, bank_img: torch.Tensor, bank_txt: torch.Tensor,
              scale: float | torch.Tensor, own: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample symmetric InfoNCE against a frozen bank.

    img, txt: [B, e] unit-norm embeddings of the pairs (any float dtype; promoted to float64).
    bank_img, bank_txt: [K, e] unit-norm, detached. scale: exp(logit_scale), a python float or 0-d tensor.
    own: [B] int64, the bank row of each pair's own entry or -1 (``CheckpointShared.own_rows``); those negatives
    are left out. Returns [B] float64 losses (nats).
    """
    img, txt = img.double(), txt.double()
    bank_img, bank_txt = bank_img.detach().double(), bank_txt.detach().double()
    s = torch.as_tensor(scale, dtype=torch.float64, device=img.device).detach()
    pos = s * (img * txt).sum(-1)  # [B]
    neg_i2t, neg_t2i = s * img @ bank_txt.T, s * txt @ bank_img.T  # [B, K]
    if own is not None:
        mine = own.to(img.device)[:, None] == torch.arange(bank_img.shape[0], device=img.device)[None, :]
        neg_i2t, neg_t2i = neg_i2t.masked_fill(mine, float("-inf")), neg_t2i.masked_fill(mine, float("-inf"))
    i2t = torch.cat([pos[:, None], neg_i2t], dim=1)  # [B, 1+K]
    t2i = torch.cat([pos[:, None], neg_t2i], dim=1)
    return 0.5 * (torch.logsumexp(i2t, 1) + torch.logsumexp(t2i, 1)) - pos


def in_batch_detached_loss(img: torch.Tensor, txt: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """The in-batch-negatives variant for comparison: per-sample loss against the *other* pairs of the same
    batch, used as a detached bank (so per-sample gradients stay exact). A sample's value then depends on
    its batch-mates. Returns [B] float64."""
    b = img.shape[0]
    mask = ~torch.eye(b, dtype=torch.bool, device=img.device)
    img64, txt64 = img.double(), txt.double()
    s = torch.as_tensor(scale, dtype=torch.float64, device=img.device).detach()
    pos = s * (img64 * txt64).sum(-1)
    neg_i2t = (s * img64 @ txt64.detach().T).masked_select(mask).view(b, b - 1)
    neg_t2i = (s * txt64 @ img64.detach().T).masked_select(mask).view(b, b - 1)
    i2t = torch.cat([pos[:, None], neg_i2t], 1)
    t2i = torch.cat([pos[:, None], neg_t2i], 1)
    return 0.5 * (torch.logsumexp(i2t, 1) + torch.logsumexp(t2i, 1)) - pos


def clip_batch_loss(img: torch.Tensor, txt: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """The true in-batch CLIP training loss (mean over the batch, gradients through every pair); 0-d float64.
    Used for the shared training-gradient proxy G_B of Diff-In."""
    img64, txt64 = img.double(), txt.double()
    s = torch.as_tensor(scale, dtype=torch.float64, device=img.device).detach()
    logits = s * img64 @ txt64.T
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def encode_pairs(model, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image and text embeddings, [B, e] each, in the model's compute dtype (text without the padding
    after the last end-of-text token: :func:`pruner.model.clip.encode_text`)."""
    return (F.normalize(model.encode_image(images), dim=-1),
            F.normalize(encode_text(model, tokens), dim=-1))


def logit_scale_of(model) -> float:
    """exp(logit_scale) of a checkpoint, as a constant (the temperature is never differentiated)."""
    return float(model.logit_scale.detach().exp())
