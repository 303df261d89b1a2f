"""Seeded random projections of per-layer gradients.

Each linear layer l with weight gradient W_l [d_out, d_in] (and bias gradient b_l [d_out]) is projected with a
factorised sketch ``P_out W_l P_in^T`` ([k_out, k_in]) and ``P_out b_l`` ([k_out]); the per-layer blocks are
concatenated (D = sum_l k_out*k_in (+ k_out with a bias)) and reduced to exactly k dimensions with a dense sketch R [k, D].

Entries are Rademacher (+-1) or Gaussian with variance 1/(rows), so every sketch preserves inner products in
expectation: E <P x, P y> = <x, y>.

Matrices are a pure function of (seed, layer name, shape): they are generated with a CPU ``torch.Generator``
seeded from a hash of those, then moved to the compute device and cached. CPU generation (not the device's own
RNG) is deliberate: CUDA and CPU random streams differ, and every worker, GPU or CPU, must draw the same
matrices. Nothing is shipped between workers.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


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


@dataclass
class FactorizedProjector:
    """Projects per-layer gradients to ``k`` dims. ``layers`` maps layer name -> (d_out, d_in, has_bias), in the
    fixed order that defines the concatenation."""

    layers: dict[str, tuple[int, int, bool]]
    k: int = 1024
    layer_k: int = 16
    seed: int = 0
    kind: str = "rademacher"
    device: torch.device | str = "cpu"
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.offsets: dict[str, tuple[int, int, int]] = {}
        off = 0
        for name, (d_out, d_in, has_bias) in self.layers.items():
            ko, ki = min(self.layer_k, d_out), min(self.layer_k, d_in)
            self.offsets[name] = (off, ko, ki)
            off += ko * ki + (ko if has_bias else 0)
        self.concat_dim = off

    def _get(self, key: str, rows: int, cols: int) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = random_matrix(self.seed, key, rows, cols, self.kind).to(self.device)
        return self._cache[key]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out [k_out, d_out], P_in [k_in, d_in]) for one layer, on the device."""
        d_out, d_in, _ = self.layers[name]
        _, ko, ki = self.offsets[name]
        return self._get(f"{name}/out", ko, d_out), self._get(f"{name}/in", ki, d_in)

    def final(self) -> torch.Tensor:
        """The dense reduction R [k, concat_dim]."""
        return self._get("final", self.k, self.concat_dim)

    def project_activations(self, name: str, a: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """The layer's block of the concatenation from its captured tokens, without forming the weight gradient:
        a [B, T, d_in] layer inputs, gy [B, T, d_out] output gradients (float32) -> [B, block] float32 with
        block = k_out*k_in (+ k_out with a bias), equal to projecting sum_t gy_t a_t^T (and sum_t gy_t)."""
        b = a.shape[0]
        p_out, p_in = self.factors(name)
        gp = gy @ p_out.T  # [B, T, k_out]
        block = torch.einsum("bto,bti->boi", gp, a @ p_in.T).reshape(b, -1)
        if self.layers[name][2]:
            block = torch.cat([block, gp.sum(1)], 1)
        return block

    def project_weights(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Project explicit gradients: ``grads`` maps ``<layer>.weight`` ([..., d_out, d_in]) and ``<layer>.bias``
        ([..., d_out]) to tensors with the same leading batch shape. Returns [..., k] float32. This is the
        brute-force path (tests, TRAK-style baseline, projecting shared vectors)."""
        parts = []
        for name in self.layers:
            p_out, p_in = self.factors(name)
            w = grads[f"{name}.weight"].float()
            parts.append((p_out @ w @ p_in.T).flatten(-2))
            if self.layers[name][2]:
                parts.append((p_out @ grads[f"{name}.bias"].float().unsqueeze(-1)).squeeze(-1))
        return torch.cat(parts, -1) @ self.final().T
