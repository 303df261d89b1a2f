#!/usr/bin/env python
"""Throughput and peak memory of per-sample gradient features, side by side on one model, batch and device.

Variants (each in a fresh subprocess, so peak memory is measured cleanly):

* ``train_step``  a plain training step: forward + backward of the in-batch CLIP loss with respect to *all*
                  parameters (no optimiser step);
* ``engine``      ``PerSampleGradients.run`` with projected features (k dims) and exact norms, bank loss against a
                  frozen K-pair negative bank (default K = 4096);
* ``trak_style``  torch.func per-sample full gradients (vmap(grad)) of the same per-sample bank loss over the same
                  selected parameters, then a dense Gaussian projection to the same k. The [D, k] matrix is far too
                  large to hold for most models (pruner-tiny: D = 2.6M, 10 GiB at k = 1024), so, like TRAK's
                  ``BasicProjector``, it is regenerated from seeded generators block by block (per layer, at most
                  ``--trak-block-mb`` per block) on every call; ``--trak-cache-gb`` keeps it in memory when it fits.

A fourth worker, ``paired``, alternates the train step and the engine in one process; ``features_vs_train_step``
is taken from it, so a change of machine load between the separate workers cannot skew that ratio. It also times a
train step whose text tower skips the padding after the last end-of-text token, as the engine's does
(``features_vs_trimmed_train_step``, the like-for-like ratio).

Timing: ``--warmup`` untimed calls, then ``--repeats`` timed calls; the median is reported (CUDA: synchronised).
The TRAK-style warm-up runs the per-sample gradients and the first projection block only (the rest is seeded RNG
plus a GEMM of fixed shapes, and regenerating D*k numbers would dominate the run).
Peak memory: CUDA ``torch.cuda.max_memory_allocated`` minus the allocation after model construction; CPU the
``ru_maxrss`` high-water mark of the worker process minus its value after model construction.

Usage::

    python benchmarks/bench_gradients.py --arch pruner-tiny --batch-size 32 --k 1024 --device cpu --repeats 5
    python benchmarks/bench_gradients.py --device cuda --out benchmarks/results/gradients_gpu.json

Writes ``benchmarks/results/gradients.json`` (``--out``): ``features_vs_train_step`` (engine samples/s divided by
train-step samples/s), ``features_vs_trak_style`` (engine / TRAK-style), ``peak_memory_vs_train_step`` (engine peak
/ train-step peak), the model, device, batch size, k, every raw number and the command line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VARIANTS = ("train_step", "engine", "trak_style")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gradients.json"


# -- shared helpers (also used by bench_diffin_cost.py) ------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def build_model(arch: str, device: torch.device, seed: int = 0):
    """Linearised open_clip model (random weights, eval mode) on the device, and its tokenizer."""
    from pruner.model.clip import create_clip, linearize_clip
    torch.manual_seed(seed)
    model, _, tokenizer = create_clip(arch)
    return linearize_clip(model).to(device).eval(), tokenizer


def image_size(model) -> tuple[int, int]:
    size = model.visual.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def make_batch(model, tokenizer, n: int, device: torch.device, seed: int = 1):
    """n random images of the model's input size and n distinct captions (token ids), on the device."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *image_size(model), generator=g)
    words = ["cat", "dog", "truck", "ship", "frog", "horse", "bird", "car", "deer", "plane"]
    captions = [f"a photo of a {words[i % 10]} number {i} on a {words[(i * 7) % 10]} background" for i in range(n)]
    return images.to(device), tokenizer(captions).to(device)


def random_bank(model, k: int, device: torch.device, seed: int = 2):
    """A frozen negative bank of k unit-norm (image, text) embeddings (random: the cost does not depend on them)."""
    proj = model.text_projection
    e = proj.out_features if hasattr(proj, "out_features") else proj.shape[1]
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(k, e, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(k, e, generator=g), dim=-1)
    return img.to(device), txt.to(device)


def make_train_step(model, images, tokens, device, precision, trim_text: bool = False):
    """A closure running forward + backward of the in-batch CLIP loss w.r.t. all parameters (no optimiser step).

    By default the text tower runs the full context, as open_clip's training does; ``trim_text`` cuts the padding
    after the last end-of-text token first, as the engine does (pruner.model.clip.encode_text): the like-for-like
    step, reported next to the plain one."""
    import torch.nn.functional as F
    from pruner.model.loss import clip_batch_loss, encode_pairs
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)

    def step():
        for p in params:
            p.grad = None
        with autocast(device, precision):
            img, txt = encode_pairs(model, images, tokens) if trim_text else (
                F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(tokens), dim=-1))
            loss = clip_batch_loss(img, txt, model.logit_scale.exp())
        loss.backward()
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        getattr(fn, "warmup", fn)()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict, device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every function, calls alternating round-robin (so a change of machine load affects
    every variant alike)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return -1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model}, {os.cpu_count()} logical cpus)"


# -- TRAK-style baseline ---------------------------------------------------------------------------------------------
class DenseGaussianProjector:
    """x [B, D] (given per layer) -> x R, R [D, k] with N(0, 1/k) entries, generated per (layer, row block) from a
    seeded generator on the device. Regenerated on every call unless cached (TRAK BasicProjector behaviour)."""

    def __init__(self, shapes: dict[str, int], k: int, device, seed: int = 0, block_mb: float = 256.0,
                 cache_gb: float = 0.0):
        self.k, self.device, self.seed = k, device, seed
        rows = max(1, int(block_mb * 2 ** 20 / (4 * k)))
        self.blocks = [(name, start, min(start + rows, d)) for name, d in shapes.items() for start in range(0, d, rows)]
        self.total_dim = sum(shapes.values())
        self.cached = self.total_dim * k * 4 <= cache_gb * 2 ** 30
        self._cache: dict = {}
        self.generator = torch.Generator(device=device)

    def _block(self, i: int) -> torch.Tensor:
        if self.cached and i in self._cache:
            return self._cache[i]
        name, a, b = self.blocks[i]
        self.generator.manual_seed(self.seed * 1_000_003 + i)
        m = torch.randn(b - a, self.k, generator=self.generator, device=self.device).mul_(1.0 / math.sqrt(self.k))
        if self.cached:
            self._cache[i] = m
        return m

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = {n: g.reshape(g.shape[0], -1).float() for n, g in grads.items()}
        b = next(iter(flat.values())).shape[0]
        out = torch.zeros(b, self.k, device=self.device)
        for i, (name, a, e) in enumerate(self.blocks):
            out.addmm_(flat[name][:, a:e], self._block(i))
        return out


def make_trak_step(model, engine, images, tokens, loss_fn, k, device, precision, block_mb, cache_gb, timings):
    from torch.func import functional_call, grad, vmap
    names = list(engine.params())
    params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}
    from tests.reference import _Encoder  # the same functional encoder the correctness tests use
    enc_img, enc_txt = _Encoder(model, "image"), _Encoder(model, "text")
    proj = DenseGaussianProjector({n: p.numel() for n, p in params.items()}, k, device, block_mb=block_mb,
                                  cache_gb=cache_gb)

    def one(p, image, tok):
        wrapped = {f"m.{n}": v for n, v in p.items()}
        img = functional_call(enc_img, wrapped, (image[None],), strict=False)
        txt = functional_call(enc_txt, wrapped, (tok[None],), strict=False)
        return loss_fn(img, txt).sum()

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))

    def grads_only():
        # outer no_grad: the model's unselected parameters still require grad, and without it torch.func would
        # record an outer autograd graph through the per-sample gradients (keeping every projection block alive)
        with torch.no_grad(), autocast(device, precision):
            return per_sample(params, images, tokens)

    def step():
        t0 = time.perf_counter()
        grads = grads_only()
        sync(device)
        t1 = time.perf_counter()
        feats = proj.project(grads)
        sync(device)
        timings.append((t1 - t0, time.perf_counter() - t1))
        return feats

    def warmup():
        """Per-sample gradients plus the first projection block: the rest of the projection is seeded RNG and a
        GEMM of fixed shapes, which need no warm-up (and regenerating ~D*k numbers would dominate the run)."""
        grads = grads_only()
        name, a, e = proj.blocks[0]
        grads[name].reshape(grads[name].shape[0], -1)[:, a:e].float() @ proj._block(0)

    step.warmup = warmup

    info = {"projection_dim_D": proj.total_dim, "projection_blocks": len(proj.blocks),
            "projection_matrix": "cached" if proj.cached else "regenerated per call (seeded, block by block)",
            "projection_matrix_gb": proj.total_dim * k * 4 / 2 ** 30,
            "warmup_note": "warm-up = per-sample gradients + first projection block"}
    return step, info


# -- worker --------------------------------------------------------------------------------------------------------
def run_worker(args) -> dict:
    import warnings
    warnings.filterwarnings("ignore")
    from pruner.grads.engine import PerSampleGradients
    from pruner.model.loss import bank_loss, logit_scale_of

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, tokenizer = build_model(args.arch, device)
    images, tokens = make_batch(model, tokenizer, args.batch_size, device)
    bank_img, bank_txt = random_bank(model, args.bank_size, device)
    scale = logit_scale_of(model)
    loss_fn = lambda i, t: bank_loss(i, t, bank_img, bank_txt, scale)  # noqa: E731
    engine = PerSampleGradients(model, k=args.k, precision=args.precision)
    selected = sum(p.numel() for p in engine.params().values())
    info: dict = {"torch_threads": torch.get_num_threads(), "selected_parameters": selected,
                  "all_parameters": sum(p.numel() for p in model.parameters()), "selected_layers": len(engine.layers)}

    if args.worker == "paired":
        # train step and engine alternately in one process: their ratio is then immune to machine-load drift
        fns = {"train_step": make_train_step(model, images, tokens, device, args.precision),
               "train_step_trimmed": make_train_step(model, images, tokens, device, args.precision, trim_text=True),
               "engine": lambda: engine.run(images, tokens, loss_fn, features=True, norms=True)}
        times = time_interleaved(fns, device, args.warmup, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {"variant": "paired", "times_s": times, "median_s": med,
                "samples_per_s": {k: args.batch_size / v for k, v in med.items()},
                "engine_vs_train_step_speed": med["train_step"] / med["engine"],
                "engine_vs_trimmed_train_step_speed": med["train_step_trimmed"] / med["engine"], **info}
    if args.worker == "train_step":
        fn = make_train_step(model, images, tokens, device, args.precision)
    elif args.worker == "engine":
        fn = lambda: engine.run(images, tokens, loss_fn, features=True, norms=True)  # noqa: E731
    else:
        trak_timings: list = []
        fn, trak_info = make_trak_step(model, engine, images, tokens, loss_fn, args.k, device, args.precision,
                                       args.trak_block_mb, args.trak_cache_gb, trak_timings)
        info.update(trak_info)

    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    base_rss, base_rss_now = maxrss_bytes(), current_rss_bytes()

    times = time_calls(fn, device, args.warmup, args.repeats)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base_alloc
        mem = {"peak_memory_bytes": int(peak), "memory_method": "torch.cuda.max_memory_allocated - allocated after "
               "model construction", "baseline_bytes": int(base_alloc)}
    else:
        peak = maxrss_bytes() - base_rss
        mem = {"peak_memory_bytes": int(peak), "memory_method": "ru_maxrss(end) - ru_maxrss(after model "
               "construction), fresh process", "baseline_maxrss_bytes": base_rss, "baseline_rss_bytes": base_rss_now}
    med = statistics.median(times)
    out = {"variant": args.worker, "times_s": times, "median_s": med, "samples_per_s": args.batch_size / med,
           "per_sample_ms": 1e3 * med / args.batch_size, **mem, **info}
    if args.worker == "trak_style":
        g = [t[0] for t in trak_timings[-args.repeats:]]
        p = [t[1] for t in trak_timings[-args.repeats:]]
        out.update({"median_per_sample_grads_s": statistics.median(g), "median_projection_s": statistics.median(p)})
    return out


# -- driver --------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="pruner-tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--k", type=int, default=1024, help="projection dimension (engine and TRAK-style)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per variant (median reported; >= 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--bank-size", type=int, default=4096, help="negative bank K of the per-sample loss")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--trak-block-mb", type=float, default=256.0, help="largest generated projection block")
    p.add_argument("--trak-cache-gb", type=float, default=0.0,
                   help="keep the dense projection matrix in memory when it is at most this large")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default). On a shared, oversubscribed CPU 1 thread avoids "
                        "OpenMP barrier stalls that make multi-threaded timings erratic")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--worker", choices=VARIANTS + ("paired",), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 5 and not args.worker:
        p.error("--repeats must be at least 5")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(run_worker(args)))
        return {}
    from pruner.io.atomic import write_json_atomic
    argv = sys.argv[1:] if argv is None else list(argv)
    device = resolve_device(args.device)
    results = {}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in chosen:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if "train_step" in chosen and "engine" in chosen:
        chosen.append("paired")
    for variant in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--device", str(device),
                   "--worker", variant, "--worker-out", str(out)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
            results[variant] = json.loads(out.read_text())
            results[variant]["process_wall_s"] = time.perf_counter() - t0
        r = results[variant]
        if variant == "paired":
            print(f"{'paired':>11}: train step {r['samples_per_s']['train_step']:.1f} samples/s (with the text "
                  f"padding cut: {r['samples_per_s']['train_step_trimmed']:.1f}), engine "
                  f"{r['samples_per_s']['engine']:.1f} samples/s (alternating in one process)", flush=True)
            continue
        print(f"{variant:>11}: {r['samples_per_s']:9.1f} samples/s  median {r['median_s'] * 1e3:9.1f} ms/batch  "
              f"peak {r['peak_memory_bytes'] / 2 ** 20:9.1f} MiB", flush=True)

    def ratio(a, b, key):
        if a in results and b in results and results[b][key]:
            return results[a][key] / results[b][key]
        return None

    paired = results.get("paired")
    report = {
        "features_vs_train_step": paired["engine_vs_train_step_speed"] if paired
        else ratio("engine", "train_step", "samples_per_s"),
        "features_vs_trimmed_train_step": paired["engine_vs_trimmed_train_step_speed"] if paired else None,
        "features_vs_train_step_separate_processes": ratio("engine", "train_step", "samples_per_s"),
        "features_vs_trak_style": ratio("engine", "trak_style", "samples_per_s"),
        "peak_memory_vs_train_step": ratio("engine", "train_step", "peak_memory_bytes"),
        "peak_memory_vs_trak_style": ratio("engine", "trak_style", "peak_memory_bytes"),
        "trak_style_vs_train_step": ratio("trak_style", "train_step", "samples_per_s"),
        "model": args.arch,
        "device": device_name(device),
        "device_type": device.type,
        "batch_size": args.batch_size,
        "k": args.k,
        "precision": args.precision,
        "bank_size": args.bank_size,
        "threads": args.threads or "torch default",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "variants": results,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv == sys.argv[1:]
        else " ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_gradients.py", *argv]),
        "torch": torch.__version__,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": "samples/s = batch_size / median batch time. features_vs_train_step comes from the 'paired' run "
                 "(train step and engine alternating in one process, robust to load drift); the separate-process "
                 "runs give the peak memory, the TRAK-style numbers and features_vs_train_step_separate_processes. "
                 "The engine row is one forward + activation-only "
                 "backward with features and exact norms; train_step is forward + backward of the in-batch CLIP "
                 "loss w.r.t. all parameters (including the token embedding), no optimiser step, with the text "
                 "tower over the full context as open_clip trains. The engine drops the text padding after the "
                 "batch's last end-of-text token (exact: causal mask, EOT pooling); "
                 "features_vs_trimmed_train_step compares with a train step that drops it too. Same linearised "
                 "model for all variants.",
    }
    write_json_atomic(args.out, report)
    for key in ("features_vs_train_step", "features_vs_trak_style", "peak_memory_vs_train_step"):
        v = report[key]
        print(f"{key}: {v:.3f}" if v is not None else f"{key}: n/a")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
