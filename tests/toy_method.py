"""A toy score method, to show that a new method is one module (tests/test_methods.py runs it in a real job): the
CLIP score minus the loss at the last checkpoint, from components every job forms."""
from __future__ import annotations

from pruner.scores.methods import ScoreMethod


class ToyMargin(ScoreMethod):
    def combine(self, per_ckpt, weights, uids, seed):
        last = per_ckpt[-1]
        return {"toy_margin": last["clip_score"] - last["loss"]}


METHOD = ToyMargin("toy", ("toy_margin",))
