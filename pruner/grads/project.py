"""Seeded random projections of per-layer gradients.

Two stages. Stage 1 sketches each linear layer l's gradient ``G_l = [W_l | b_l]`` ([d_out, d_in] weight, optional
[d_out] bias) into a block; the blocks are concatenated (D = sum of the block sizes). Stage 2 reduces the
concatenation to exactly k dimensions with one dense sketch R [k, D]. The Khatri-Rao blocks (below) of m <= k rows
skip stage 2 (``single_token_direct``, the default): each is already an m-dimensional sketch, so it is added
straight into the first m of the k output dimensions (independent zero-mean sketches of different layers add
without bias). That spares them R's second layer of noise and shrinks R (pruner-tiny at k = 1024: D 15,264 ->
7,072, matrices 78 -> 46 MiB).
Every sketch has ``E[S^T S] = I``, so
``E <P g, P g'> = <g, g'>`` (unbiased inner products), and every stage is linear in the gradient, so projecting an
explicit gradient (:meth:`FactorizedProjector.project_weights`: shared directions, tests, the TRAK-style baseline)
and projecting captured activations (:meth:`FactorizedProjector.project_activations`: the engine's hot path,
``G = sum_t gy_t a_t^T``) give the same features.

Stage 1 has two per-layer sketches, both built from a pair of seeded factors (P_out, P_in):

* **Kronecker** (multi-token layers, the default): ``P_out G P_in^T`` with P_out [k_out, d_out], P_in [k_in, d_in]
  (k_out = min(layer_k, d_out), likewise k_in; default layer_k = 16), plus ``P_out b``; block k_out k_in (+ k_out).
  Per token it costs layer_k (d_out + d_in) multiply-adds, a few percent of the layer's own forward.
* **Khatri-Rao** (single-token layers): m rows, ``y_j = p_j^T G q_j`` with p_j, q_j the j-th rows of P_out
  [m, d_out] and P_in [m, d_in (+1 for the bias)] - the diagonal of an m x m factorised sketch, or m independent
  1 x 1 factorised sketches (the "tensor random projection" of Sun et al., 2018); block m
  (``single_token_k``, default min(k, 1024)).

Why two (issue 4). A layer whose per-sample gradient comes from one token is rank 1, ``G = g a^T``, and the
Kronecker sketch's inner product factorises: ``<P_out g, P_out g'> <P_in a, P_in a'>``, the product of two
16-dimensional estimates, with a relative variance of about 2/k_out + 2/k_in (~ 1/4) however large the block.
The Khatri-Rao sketch of the same rank-1 gradient has a relative variance of about c/m (c ~ 2-4) at a block of m,
close to a dense m-dimensional sketch. CLIP has such layers: both output projections (``visual.proj``,
``text_projection``: one pooled token) and, because only the pooled token's output is used, the attention output
projection and both MLP layers of each tower's last residual block. They carry 44-55 % of the variance of the
exact pairwise inner products (pruner-micro; ViT-B-32 after SGD). Pearson of projected with exact inner products
at k = 1024, mean (worst) over seeds, Kronecker everywhere -> Khatri-Rao blocks (m = 1024): pruner-micro random
0.949 (0.897) -> 0.978 (0.962), after SGD 0.805 (0.563) -> 0.958 (0.922), ViT-B-32 after SGD 0.974 (0.966) ->
0.992 (0.991); a dense +-1 sketch of the whole gradient gives 0.990 / 0.965 on pruner-micro, so what remains
is the k-dimensional reduction's own noise. Measured side by side (benchmarks/projection_quality.py,
benchmarks/RESULTS.md): larger Kronecker factors for these layers (k x k factors: relative variance ~4/k, so a
block of k^2 buys less than a Khatri-Rao block of k), several independent Kronecker sketches concatenated (the
same variance per multiply-add as Khatri-Rao with r times the block and matrices), and exact blocks (as good, but
D grows by d_out d_in per layer: a 32 GiB R for ViT-B-32). Multi-token layers keep the Kronecker sketch: there
its noise is small, and a Khatri-Rao block would cost m (d_out + d_in) multiply-adds per token, about as much as
the layer itself. Matrices at k = 1024: ViT-B-32 119 -> 211 MiB (D 26,624 -> 32,672), pruner-tiny 37 -> 78 MiB.

Cost of the Khatri-Rao layers: their gradient has one token with a non-zero output gradient per sample (the
last-block layers see the whole sequence, but the other tokens' gy is exactly zero), so
:meth:`~FactorizedProjector.project_activations` gathers that token first (one host sync per such layer and
batch on CUDA) and the block costs m (d_out + d_in) multiply-adds per sample: +0.5 % of the linear layers' forward
multiply-adds on ViT-B-32.
If a layer named single-token turns out to have several tokens, the block is still exact (the sketch is linear)
but costs T times more; a warning says so once per layer.

Which layers are single-token: ``single_token_layers``, fnmatch patterns; ``None`` (default) picks them from
the layer names of a linearised open_clip model (:func:`find_single_token_layers`). ``single_token_k = 0`` turns the
Khatri-Rao blocks off (the Kronecker sketch everywhere, the sketch before this change).

Entries are Rademacher (+-1) or Gaussian; the factors are scaled so each sketch is unbiased. Matrices are a
pure function of (seed, layer name, shape, kind, sketch: the Khatri-Rao factors have names of their own; under the
automatic rule a layer's sketch depends on which blocks are selected, through the last block index): they are
generated with a CPU ``torch.Generator`` seeded from a
hash of those, then moved to the compute device and cached. CPU generation (not the device's own RNG) is
deliberate: CUDA and CPU random streams differ, and every worker, GPU or CPU, must draw the same matrices.
Nothing is shipped between workers.
"""
from __future__ import annotations

import fnmatch
import hashlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

#: The output projections of a linearised open_clip model (pruner.model.clip.linearize_clip): one pooled token.
OUTPUT_PROJECTIONS = ("visual.proj", "text_projection")
#: Layers of a tower's last residual block that only the pooled token's output reaches (its gy is zero elsewhere).
_LAST_BLOCK = re.compile(r"^(?P<tower>(?:.*\.)?)resblocks\.(?P<i>\d+)\.(?:attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$")
_RESBLOCK = re.compile(r"^(?P<tower>(?:.*\.)?)resblocks\.(?P<i>\d+)\.")


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def random_matrix(seed: int, name: str, rows: int, cols: int, kind: str = "rademacher") -> torch.Tensor:
    """A [rows, cols] float32 CPU sketch with E[M^T M] = I_cols, a pure function of its arguments."""
    g = torch.Generator().manual_seed(_seed_for(seed, f"{name}:{rows}x{cols}:{kind}"))
    if kind == "rademacher":
        m = torch.randint(0, 2, (rows, cols), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
    elif kind == "gaussian":
        m = torch.randn(rows, cols, generator=g)
    else:
        raise ValueError(f"unknown projection kind {kind!r} (fix: rademacher or gaussian)")
    return m.div_(rows ** 0.5)


def find_single_token_layers(names: Sequence[str], patterns: Optional[Sequence[str]] = None) -> list[str]:
    """The layers (of ``names``) whose per-sample gradient comes from a single token.

    ``patterns``: fnmatch patterns, or None for the rule for linearised open_clip models: both output projections
    (:data:`OUTPUT_PROJECTIONS`) and, in each tower (``...resblocks.<i>.``), the last block's ``attn.out_proj``,
    ``mlp.c_fc`` and ``mlp.c_proj`` (only the pooled token's output of that block is used). "Last" is the highest
    block index among ``names`` for that tower.
    """
    if patterns is not None:
        return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    last: dict[str, int] = {}
    for n in names:
        if (m := _RESBLOCK.match(n)):
            last[m["tower"]] = max(last.get(m["tower"], -1), int(m["i"]))
    out = []
    for n in names:
        m = _LAST_BLOCK.match(n)
        if n in OUTPUT_PROJECTIONS or (m and int(m["i"]) == last[m["tower"]]):
            out.append(n)
    return out


@dataclass
class FactorizedProjector:
    """Projects per-layer gradients to ``k`` dims. ``layers`` maps layer name -> (d_out, d_in, has_bias), in the
    fixed order that defines the concatenation.

    ``offsets[name]`` is ``(offset, k_out, k_in)`` of the layer's block in the concatenation: for a Kronecker
    block k_out x k_in (+ k_out bias entries), for a Khatri-Rao block ``(offset, m, 0)`` (m entries, the bias
    folded in). ``block_dims[name]`` is the block's size, ``single_token`` the set of Khatri-Rao layers.
    The first ``reduced_dim`` columns are reduced by R; with ``single_token_direct`` (and m <= k) every Khatri-Rao
    block adds into the k columns after them, which :meth:`reduce` adds to the output as they are
    (``concat_dim = reduced_dim + k``).
    """

    layers: dict[str, tuple[int, int, bool]]
    k: int = 1024
    layer_k: int = 16
    seed: int = 0
    kind: str = "rademacher"
    device: torch.device | str = "cpu"
    single_token_k: Optional[int] = None  # None: min(k, 1024)
    single_token_layers: Optional[Sequence[str]] = None
    single_token_direct: bool = True  # Khatri-Rao blocks straight into the output (when single_token_k <= k)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.single_token_k is None:
            self.single_token_k = min(self.k, 1024)
        if self.k <= 0 or self.layer_k <= 0 or self.single_token_k < 0:
            raise ValueError(f"k={self.k}, layer_k={self.layer_k} must be > 0 and single_token_k="
                             f"{self.single_token_k} >= 0")
        self.single_token = (set(find_single_token_layers(list(self.layers), self.single_token_layers))
                             if self.single_token_k else set())
        self.offsets: dict[str, tuple[int, int, int]] = {}
        self.block_dims: dict[str, int] = {}
        self._warned: set[str] = set()
        direct = self.single_token_direct and self.single_token_k <= self.k
        off = 0
        for name, (d_out, d_in, has_bias) in self.layers.items():
            if name in self.single_token:
                self.block_dims[name] = self.single_token_k
                if direct:
                    continue  # placed after the reduced blocks, below
                self.offsets[name] = (off, self.single_token_k, 0)
            else:
                ko, ki = min(self.layer_k, d_out), min(self.layer_k, d_in)
                self.offsets[name] = (off, ko, ki)
                self.block_dims[name] = ko * ki + (ko if has_bias else 0)
            off += self.block_dims[name]
        self.reduced_dim = off  # the columns R reduces
        if direct and self.single_token:
            for name in self.single_token:
                self.offsets[name] = (off, self.single_token_k, 0)  # every Khatri-Rao block adds into these k columns
            off += self.k
        self.concat_dim = off

    def _get(self, key: str, rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
        if key not in self._cache:
            m = random_matrix(self.seed, key, rows, cols, self.kind)
            self._cache[key] = (m if scale == 1.0 else m.mul_(scale)).to(self.device)
        return self._cache[key]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out, P_in) for one layer, on the device. Kronecker layers: P_out [k_out, d_out], P_in [k_in, d_in],
        entries of variance 1/rows. Khatri-Rao layers: P_out [m, d_out] with entries of variance 1/m and P_in
        [m, d_in (+1 with a bias: the bias column)] with unit-variance entries, so y = sum_t (P_out gy_t) * (P_in a_t)
        (elementwise) has E <y, y'> = <G, G'>."""
        d_out, d_in, has_bias = self.layers[name]
        _, ko, ki = self.offsets[name]
        if name in self.single_token:
            m = self.single_token_k
            return (self._get(f"{name}/kr_out", m, d_out),
                    self._get(f"{name}/kr_in", m, d_in + int(has_bias), scale=m ** 0.5))
        return self._get(f"{name}/out", ko, d_out), self._get(f"{name}/in", ki, d_in)

    def final(self) -> torch.Tensor:
        """The dense reduction R [k, reduced_dim]."""
        return self._get("final", self.k, self.reduced_dim)

    def add_block(self, concat: torch.Tensor, name: str, block: torch.Tensor) -> None:
        """Add layer ``name``'s block [..., block_dims[name]] into its place in ``concat`` [..., concat_dim] (in place;
        directly added Khatri-Rao blocks share their columns, so this adds rather than writes)."""
        off = self.offsets[name][0]
        concat[..., off:off + block.shape[-1]] += block

    def reduce(self, concat: torch.Tensor) -> torch.Tensor:
        """Stage-1 concatenations [..., concat_dim] -> projected features [..., k]: R times the reduced blocks,
        plus the directly added Khatri-Rao blocks (the last k columns, when there are any)."""
        out = concat[..., :self.reduced_dim] @ self.final().T
        if self.concat_dim > self.reduced_dim:
            out = out + concat[..., self.reduced_dim:]
        return out

    def matrix_bytes(self) -> int:
        """Bytes of every projection matrix of this projector (float32), without generating them."""
        n = self.k * self.reduced_dim
        for name, (d_out, d_in, has_bias) in self.layers.items():
            _, ko, ki = self.offsets[name]
            n += ko * (d_out + d_in + int(has_bias)) if name in self.single_token else ko * d_out + ki * d_in
        return 4 * n

    # -- projecting ---------------------------------------------------------------------------------------------
    def _single_token(self, name: str, a: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the one token per sample whose output gradient is non-zero (exact: the others add zero)."""
        b, t = a.shape[:2]
        if t == 1:
            return a, gy
        mag = gy.abs().amax(-1)  # [B, T]
        n_live = int((mag > 0).sum(1).max())  # host sync on CUDA, once per layer and batch
        if n_live > 1:
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"layer {name} is sketched as single-token but its gradient has up to {n_live} "
                              f"tokens: exact, but {t} x the cost (fix: set features.single_token_layers to the "
                              f"layers with one pooled token)", stacklevel=3)
            return a, gy
        idx = mag.argmax(1)  # the live token (the first when none: its gy is zero too)
        rows = torch.arange(b, device=a.device)
        return a[rows, idx].unsqueeze(1), gy[rows, idx].unsqueeze(1)

    def project_activations(self, name: str, a: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """The layer's block of the concatenation from its captured tokens, without forming the weight gradient:
        a [B, T, d_in] layer inputs, gy [B, T, d_out] output gradients (float32) -> [B, block_dims[name]] float32,
        equal to projecting G = sum_t gy_t a_t^T (and the bias gradient sum_t gy_t)."""
        b = a.shape[0]
        p_out, p_in = self.factors(name)
        has_bias = self.layers[name][2]
        if name in self.single_token:
            a, gy = self._single_token(name, a, gy)
            gp = gy @ p_out.T  # [B, T', m]
            d_in = a.shape[-1]
            block = (gp * (a @ p_in[:, :d_in].T)).sum(1)
            if has_bias:
                block = block + gp.sum(1) * p_in[:, d_in]
            return block
        gp = gy @ p_out.T  # [B, T, k_out]
        block = torch.einsum("bto,bti->boi", gp, a @ p_in.T).reshape(b, -1)
        if has_bias:
            block = torch.cat([block, gp.sum(1)], 1)
        return block

    def project_weights(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Project explicit gradients: ``grads`` maps ``<layer>.weight`` ([..., d_out, d_in]) and ``<layer>.bias``
        ([..., d_out]) to tensors with the same leading batch shape. Returns [..., k] float32. This is the
        brute-force path (tests, TRAK-style baseline, projecting shared vectors)."""
        concat = None
        for name, (_, d_in, has_bias) in self.layers.items():
            p_out, p_in = self.factors(name)
            w = grads[f"{name}.weight"].float()
            if name in self.single_token:
                block = ((p_out @ w) * p_in[:, :d_in]).sum(-1)  # diag(P_out W P_in^T)
                if has_bias:
                    block = block + (p_out @ grads[f"{name}.bias"].float().unsqueeze(-1)).squeeze(-1) * p_in[:, d_in]
            else:
                block = (p_out @ w @ p_in.T).flatten(-2)
                if has_bias:
                    block = torch.cat([block, (p_out @ grads[f"{name}.bias"].float().unsqueeze(-1)).squeeze(-1)], -1)
            if concat is None:
                concat = block.new_zeros(*block.shape[:-1], self.concat_dim)
            self.add_block(concat, name, block)
        return self.reduce(concat)
