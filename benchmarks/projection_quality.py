#!/usr/bin/env python
"""How well do projected per-sample gradients preserve inner products? Per-layer diagnosis and sketch variants.

For n samples (default 24, the 276 pairs i < j of tests/test_grads.py) the script captures every linear layer's
inputs ``a`` [n, T, d_in] and output gradients ``gy`` [n, T, d_out] with the engine's own hooks, computes the
exact per-layer Gram matrices ``<G_i, G_j>`` (Gram trick, float64), and compares them with sketched ones:

* per layer: its share of the variance of the exact pairwise inner products (``share``: Cov(x_l, x) / Var(x), sums
  to 1), its effective token count (tokens with a non-zero output gradient), and the sketch noise of that layer
  (std over pairs of estimate - exact, relative to the std of the exact total);
* total: Pearson correlation of ``<P g_i, P g_j>`` with ``<g_i, g_j>`` after the dense reduction to k, for several
  sketch variants, over several seeds (mean and min), with the variant's concatenation size D, its matrix memory
  and its projection multiply-adds per sample.

Variants (``--variants``; the factorised sketch of the issue everywhere, and something else for the layers whose
per-sample gradient has a single token, i.e. rank 1):

* ``kron16``            P_out G P_in^T with 16 x 16 factors everywhere (the sketch before this change)
* ``kron<k>_st``        k x k factors for the single-token layers
* ``rep<r>_st``         r independent 16 x 16 factorised sketches concatenated (scaled 1/sqrt r), single-token layers
* ``kr<m>_st``          m independent 1 x 1 factorised sketches (the diagonal of P_out G P_in^T with m x m
                        factors; a Khatri-Rao sketch) for the single-token layers
* ``identity_st``       no sketch for the single-token layers (their full gradient enters the concatenation)
* ``<a>/<b>/<c>``       spec ``a`` for the output projections, ``b`` for the other single-token layers, ``c`` for
                        the multi-token layers (each ``kron<k>``, ``rep<r>``, ``kr<m>`` or ``id``)
* ``dense``             one dense Rademacher (+-1) sketch of the whole flattened gradient to k (TRAK-style; the
                        reference)
* ``projector``         :class:`pruner.grads.project.FactorizedProjector` with its defaults (what the engine runs);
  ``projector_m<m>``    the same with ``single_token_k=m`` (``projector_m0``: the Kronecker sketch everywhere);
  ``projector_viaR``    the same with ``single_token_direct=False`` (the Khatri-Rao blocks reduced by R too, as
                        before they were added straight into the output)

The script's own variants (all but ``projector*``) reduce with seeded column chunks of R, so their seeds are not
the projector's; ``projector*`` use the engine's matrices and concatenation order exactly.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/projection_quality.py --arch pruner-micro --seeds 10
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/projection_quality.py --arch ViT-B-32 --params random --seeds 3
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/projection_quality.py --time pruner-tiny --batch-size 32

``--cache DIR`` keeps the captured activations (ViT-B-32: the SGD steps and the capture take minutes on a CPU).
``--time ARCH`` only times ``PerSampleGradients.run`` with the default projector and with ``single_token_k=0``,
alternating (paired), and prints the time spent inside ``project_activations``.

Writes ``benchmarks/results/projection_quality[_<arch>].json`` (``--out``).
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pruner.grads.engine import PerSampleGradients, select_layers  # noqa: E402
from pruner.grads.project import FactorizedProjector, random_matrix  # noqa: E402
from pruner.io.atomic import atomic_path, write_json_atomic  # noqa: E402
from pruner.model.clip import create_clip, linearize_clip  # noqa: E402
from pruner.model.loss import bank_loss, encode_pairs, logit_scale_of  # noqa: E402
from tests.reference import demo_pairs, sgd_trained  # noqa: E402  (the test suite's data and SGD proxy)



def capture(model, images, tokens, loss_fn) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """{layer: (a [n, T, d_in], gy [n, T, d_out], has_bias)} from the engine's hooks (float32)."""
    eng = PerSampleGradients(model, k=8, layer_k=2)
    got = {}

    def record(name, a, gy):
        got[name] = (a.detach().clone(), gy.detach().clone(), eng.layers[name].bias is not None)
        return torch.zeros(a.shape[0], eng.projector.block_dims[name])

    eng.projector.project_activations = record
    eng.run(images, tokens, loss_fn, norms=False)
    return {name: got[name] for name in eng.layers}  # the engine's order, which defines the concatenation


def exact_gram(a, gy, has_bias) -> torch.Tensor:
    """[n, n] float64 <G_i, G_j> for G = sum_t gy_t a_t^T (+ bias sum_t gy_t)."""
    n, t, _ = a.shape
    a2, g2 = a.double().reshape(n * t, -1), gy.double().reshape(n * t, -1)
    k = ((g2 @ g2.T) * (a2 @ a2.T)).reshape(n, t, n, t).sum((1, 3))
    if has_bias:
        s = gy.double().sum(1)
        k = k + s @ s.T
    return k


def effective_tokens(gy) -> float:
    nrm = gy.double().norm(dim=-1)  # [n, T]
    return float((nrm > 1e-6 * nrm.amax(1, keepdim=True)).sum(1).double().median())


# -- sketch variants -----------------------------------------------------------------------------------------------
def kron_block(seed, name, a, gy, has_bias, ko, ki, reps=1, kind="rademacher"):
    """``reps`` independent factorised sketches P_out^j G P_in^jT (ko x ki), concatenated, scaled 1/sqrt(reps)."""
    n = a.shape[0]
    d_out, d_in = gy.shape[-1], a.shape[-1]
    ko, ki = min(ko, d_out), min(ki, d_in)
    parts = []
    for j in range(reps):
        tag = "" if j == 0 else f"#{j}"
        p_out = random_matrix(seed, f"{name}/out{tag}", ko, d_out, kind).double()
        p_in = random_matrix(seed, f"{name}/in{tag}", ki, d_in, kind).double()
        gp = gy.double() @ p_out.T
        parts.append(torch.einsum("bto,bti->boi", gp, a.double() @ p_in.T).reshape(n, -1))
        if has_bias:
            parts.append(gp.sum(1))
    return torch.cat(parts, 1) / math.sqrt(reps), reps * (ko * d_out + ki * d_in), reps * (ko * d_out + ki * d_in)


def kr_block(seed, name, a, gy, has_bias, m, kind="rademacher"):
    """Khatri-Rao sketch: y_j = sum_t (p_j . gy_t)(q_j . a_t) / sqrt(m), p_j, q_j with unit-variance entries."""
    d_out, d_in = gy.shape[-1], a.shape[-1]
    p_out = random_matrix(seed, f"{name}/kr_out", m, d_out, kind).double() * math.sqrt(m)
    p_in = random_matrix(seed, f"{name}/kr_in", m, d_in, kind).double() * math.sqrt(m)
    y = ((gy.double() @ p_out.T) * (a.double() @ p_in.T)).sum(1) / math.sqrt(m)
    parts = [y]
    if has_bias:
        kb = min(16, d_out)
        parts.append(gy.double().sum(1) @ random_matrix(seed, f"{name}/bias", kb, d_out, kind).double().T)
    return torch.cat(parts, 1), m * (d_out + d_in), m * (d_out + d_in)


def identity_block(a, gy, has_bias):
    g = torch.einsum("bto,bti->boi", gy.double(), a.double()).flatten(1)
    parts = [g] + ([gy.double().sum(1)] if has_bias else [])
    return torch.cat(parts, 1), 0, g.shape[1]


def spec_block(spec: str, seed, name, a, gy, hb):
    if (mt := re.fullmatch(r"kron(\d+)", spec)):
        return kron_block(seed, name, a, gy, hb, int(mt[1]), int(mt[1]))
    if (mt := re.fullmatch(r"rep(\d+)", spec)):
        return kron_block(seed, name, a, gy, hb, 16, 16, reps=int(mt[1]))
    if (mt := re.fullmatch(r"kr(\d+)", spec)):
        return kr_block(seed, name, a, gy, hb, int(mt[1]))
    if spec == "id":
        return identity_block(a, gy, hb)
    raise ValueError(spec)


ALIASES = {"kron16": "kron16/kron16/kron16", "identity_st": "id/id/kron16"}


def variant_blocks(variant: str, seed: int, acts: dict, single: set):
    """{layer: (block [n, b] float64, matrix floats, projection multiply-adds per sample)}.

    A variant is ``<output projections>/<other single-token layers>/<multi-token layers>`` (each ``kron<k>``,
    ``rep<r>``, ``kr<m>`` or ``id``), or ``<spec>_st`` for ``<spec>/<spec>/kron16``."""
    variant = ALIASES.get(variant, variant)
    if variant.endswith("_st"):
        variant = f"{variant[:-3]}/{variant[:-3]}/kron16"
    s_proj, s_last, s_multi = variant.split("/")
    out = {}
    for name, (a, gy, hb) in acts.items():
        spec = (s_proj if a.shape[1] == 1 else s_last) if name in single else s_multi
        blk, mem, per_token = spec_block(spec, seed, name, a, gy, hb)
        # the projector gathers the one live token of a single-token layer before a Khatri-Rao sketch
        tokens = effective_tokens(gy) if spec.startswith("kr") else a.shape[1]
        out[name] = (blk, mem, tokens * per_token)
    return out


def reduce_to_k(seed: int, concat: torch.Tensor, k: int, chunk: int = 1 << 15) -> torch.Tensor:
    """concat [n, D] @ R^T with R [k, D] Rademacher / sqrt(k), generated in column chunks (seeded)."""
    out = torch.zeros(concat.shape[0], k, dtype=torch.float64)
    for c0 in range(0, concat.shape[1], chunk):
        c1 = min(c0 + chunk, concat.shape[1])
        r = random_matrix(seed, f"final-chunk{c0}", k, c1 - c0).double()
        out += concat[:, c0:c1] @ r.T
    return out


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


# -- one model ------------------------------------------------------------------------------------------------------
def analyse(label: str, acts: dict, k: int, seeds: int, variants: list[str], dense_ref: bool):
    n = next(iter(acts.values()))[0].shape[0]
    iu = torch.triu_indices(n, n, 1)
    grams = {name: exact_gram(*v) for name, v in acts.items()}
    total = sum(grams.values())
    x = total[iu[0], iu[1]]
    var_x = float(x.var())
    single = {name for name, (a, gy, _) in acts.items() if effective_tokens(gy) <= 1}
    norms = total.diagonal().sqrt()
    cos = total / norms[:, None] / norms[None, :]
    print(f"\n== {label}: {n} samples, {len(acts)} layers, mean pairwise cosine {float(cos[iu[0], iu[1]].mean()):.3f}; "
          f"single-token (rank-1) layers: {sorted(single)}")
    layers = []
    for name, (a, gy, hb) in acts.items():
        xl = grams[name][iu[0], iu[1]]
        share = float(((xl - xl.mean()) * (x - x.mean())).sum() / (x.numel() - 1)) / var_x
        noise = []
        for s in range(seeds):
            blk = kron_block(s, name, a, gy, hb, 16, 16)[0]
            est = (blk @ blk.T)[iu[0], iu[1]]
            noise.append(float((est - xl).std()) / math.sqrt(var_x))
        layers.append({"layer": name, "d_out": gy.shape[-1], "d_in": a.shape[-1], "tokens": a.shape[1],
                       "effective_tokens": effective_tokens(gy), "share_of_variance": share,
                       "diag_share": float(grams[name].trace() / total.trace()),
                       "kron16_noise_rel_std": statistics.mean(noise)})
    layers.sort(key=lambda r: -abs(r["share_of_variance"]))
    print(f"{'layer':42s} {'d_out x d_in':>12s} {'T_eff':>5s} {'var share':>9s} {'norm share':>10s} "
          f"{'16x16 noise':>11s}")
    for r in layers[:14]:
        print(f"{r['layer']:42s} {r['d_out']:>5d} x {r['d_in']:<5d} {r['effective_tokens']:5.0f} "
              f"{r['share_of_variance']:9.3f} {r['diag_share']:10.3f} {r['kron16_noise_rel_std']:11.3f}")
    st_share = sum(r["share_of_variance"] for r in layers if r["layer"] in single)
    print(f"single-token layers: {st_share:.3f} of the variance of exact inner products")

    fwd = sum(a.shape[1] * a.shape[-1] * gy.shape[-1] for a, gy, _ in acts.values())
    print(f"forward multiply-adds of the selected linear layers per sample: {fwd / 1e6:.1f}M")
    results = {}
    for variant in variants:
        rs, rs_concat = [], []
        d = mem = macs = None
        for s in range(seeds):
            if variant == "dense":
                if not dense_ref:
                    break
                flat = torch.cat([identity_block(*acts[nm])[0] for nm in acts], 1)
                f = reduce_to_k(1000 + s, flat, k)
                d, mem = flat.shape[1], k * flat.shape[1]
                macs = k * flat.shape[1]
            elif variant.startswith("projector"):
                kw = ({} if variant == "projector" else {"single_token_direct": False} if variant == "projector_viaR"
                      else {"single_token_k": int(variant.removeprefix("projector_m"))})
                proj = FactorizedProjector({nm: (gy.shape[-1], a.shape[-1], hb) for nm, (a, gy, hb) in acts.items()},
                                           k=k, seed=s, **kw)
                concat = torch.zeros(n, proj.concat_dim)
                for nm, (a, gy, hb) in acts.items():
                    proj.add_block(concat, nm, proj.project_activations(nm, a, gy))
                est_c = (concat.double() @ concat.double().T)[iu[0], iu[1]]
                rs_concat.append(pearson(x, est_c))
                f = proj.reduce(concat).double()
                d = proj.reduced_dim
                mem = proj.matrix_bytes() // 4
                macs = k * d + sum((effective_tokens(gy) if nm in proj.single_token else a.shape[1])
                                   * (proj.offsets[nm][1] * (gy.shape[-1] + a.shape[-1] + hb) if nm in proj.single_token
                                      else proj.offsets[nm][1] * gy.shape[-1] + proj.offsets[nm][2] * a.shape[-1]
                                      + proj.offsets[nm][1] * proj.offsets[nm][2])
                                   for nm, (a, gy, hb) in acts.items())
            else:
                blocks = variant_blocks(variant, s, acts, single)
                concat = torch.cat([b[0] for b in blocks.values()], 1)
                est_c = (concat @ concat.T)[iu[0], iu[1]]
                rs_concat.append(pearson(x, est_c))
                f = reduce_to_k(s, concat, k)
                d = concat.shape[1]
                mem = sum(b[1] for b in blocks.values()) + k * d
                # projection multiply-adds per sample: sum over layers of T * per-token cost (+ reduction k * D)
                macs = sum(b[2] for b in blocks.values()) + k * d
            est = (f @ f.T)[iu[0], iu[1]]
            rs.append(pearson(x, est))
        if not rs:
            continue
        results[variant] = {"pearson_mean": statistics.mean(rs), "pearson_min": min(rs), "pearson": rs,
                            "pearson_before_reduction_mean": statistics.mean(rs_concat) if rs_concat else None,
                            "concat_dim": d, "matrix_mib": mem * 4 / 2 ** 20 if mem else None,
                            "projection_macs_per_sample": macs}
        pc = f"{statistics.mean(rs_concat):.3f}" if rs_concat else "  -  "
        print(f"{variant:14s} Pearson mean {statistics.mean(rs):.3f} min {min(rs):.3f} (before reduction {pc})  "
              f"D={d}  matrices {mem * 4 / 2 ** 20 if mem else float('nan'):.1f} MiB  "
              f"proj MACs/sample {macs / 1e6 if macs else float('nan'):.2f}M")
    return {"label": label, "n": n, "linear_forward_macs_per_sample": fwd, "single_token_layers": sorted(single),
            "single_token_share": st_share,
            "layers": layers, "variants": results}


def time_engine(arch: str, batch: int, k: int, repeats: int) -> dict:
    """Paired CPU/GPU timing of PerSampleGradients.run (features and exact norms) with the default projector and
    with single_token_k=0 (the Kronecker sketch everywhere), alternating, median over ``repeats``; plus the time
    spent inside project_activations."""
    import time
    torch.manual_seed(0)
    model, preprocess, tokenizer = create_clip(arch)
    model = linearize_clip(model).eval()
    images, tokens = demo_pairs(preprocess, tokenizer, max(batch, 48))
    with torch.no_grad():
        bank_img, bank_txt = encode_pairs(model, images[-48:], tokens[-48:])
    scale = logit_scale_of(model)
    loss_fn = lambda i, t: bank_loss(i, t, bank_img, bank_txt, scale)  # noqa: E731
    eng = PerSampleGradients(model, k=k)
    projectors = {"default": eng.projector,
                  "single_token_k=0": FactorizedProjector(dict(eng.projector.layers), k=k, single_token_k=0)}
    spent = {}
    for label, proj in projectors.items():
        inner = proj.project_activations

        def timed(name, a, gy, inner=inner, label=label):
            t0 = time.perf_counter()
            out = inner(name, a, gy)
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
            return out

        proj.project_activations = timed
    times = {label: [] for label in projectors}
    proj_times = {label: [] for label in projectors}
    for r in range(repeats + 1):
        for label, proj in projectors.items():
            eng.projector = proj
            spent[label] = 0.0
            t0 = time.perf_counter()
            eng.run(images[:batch], tokens[:batch], loss_fn)
            if r:  # the first round warms up (and generates the matrices)
                times[label].append(time.perf_counter() - t0)
                proj_times[label].append(spent[label])
    out = {label: {"run_s": statistics.median(times[label]), "project_s": statistics.median(proj_times[label]),
                   "samples_per_s": batch / statistics.median(times[label]),
                   "concat_dim": projectors[label].concat_dim,
                   "matrix_mib": projectors[label].matrix_bytes() / 2 ** 20} for label in projectors}
    for label, o in out.items():
        print(f"{arch} batch {batch}: {label:17s} run {o['run_s'] * 1e3:7.1f} ms ({o['samples_per_s']:.1f} samples/s), "
              f"in project_activations {o['project_s'] * 1e3:6.1f} ms, D={o['concat_dim']}, "
              f"matrices {o['matrix_mib']:.1f} MiB")
    return {"arch": arch, "batch": batch, "k": k, "repeats": repeats, "device": "cpu",
            "threads": torch.get_num_threads(), **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="pruner-micro")
    ap.add_argument("--params", default="random,sgd")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--variants", default="kron16,kron32_st,kron64_st,rep4_st,rep16_st,kr256_st,kr1024_st,"
                                          "kr4096_st,identity_st,dense,projector")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference (big models)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default=None, help="directory to keep captured activations in (re-runs skip the "
                                                   "model work)")
    ap.add_argument("--time", default=None, metavar="ARCH", help="only time the engine on ARCH (paired, CPU)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.time:
        res = time_engine(args.time, args.batch_size, args.k, args.repeats)
        res["command"] = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
        if args.out:
            write_json_atomic(args.out, res)
        return 0
    model = None
    report = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
              "arch": args.arch, "k": args.k, "seeds": args.seeds, "torch": torch.__version__, "models": []}
    for params in args.params.split(","):
        cached = Path(args.cache) / f"acts-{args.arch}-{params}-{args.n}.pt" if args.cache else None
        if cached and cached.exists():
            acts = torch.load(cached, weights_only=True)
            order = select_layers(linearize_clip(create_clip(args.arch)[0]))  # the engine's concatenation order
            acts = {name: acts[name] for name in order}
        else:
            if model is None:
                torch.manual_seed(0)
                model, preprocess, tokenizer = create_clip(args.arch)
                model = linearize_clip(model).eval()
                images, tokens = demo_pairs(preprocess, tokenizer, 160)
            m = model if params == "random" else sgd_trained(model, images[96:], tokens[96:])
            with torch.no_grad():
                bank_img, bank_txt = encode_pairs(m, images[-48:], tokens[-48:])
            scale = logit_scale_of(m)
            loss_fn = lambda i, t: bank_loss(i, t, bank_img, bank_txt, scale)  # noqa: E731
            acts = capture(m, images[:args.n], tokens[:args.n], loss_fn)
            if cached:
                with atomic_path(cached) as tmp:
                    torch.save(acts, tmp)
        report["models"].append(analyse(f"{args.arch} {params}", acts, args.k, args.seeds, args.variants.split(","),
                                        not args.no_dense))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "projection_quality.json" if args.arch == "pruner-micro" else f"projection_quality_{args.arch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
