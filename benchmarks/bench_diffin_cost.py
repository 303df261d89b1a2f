#!/usr/bin/env python
"""Cost of Diff-In and TracIn per sample per checkpoint, as multiples of a plain training step on the same model,
batch and device, side by side in one process (repeats interleaved round-robin across variants, so a change of
machine load affects every variant alike).

Variants (time per batch of ``--batch-size`` pool samples at one checkpoint):

* ``train_step``              forward + backward of the in-batch CLIP loss w.r.t. all parameters (no optimiser), the
                              text tower over the full context as open_clip trains;
* ``train_step_trimmed``      the same without the text padding after the last end-of-text token, as every scoring
                              pass runs it (pruner.model.clip.encode_text): ``diffin_vs_trimmed_train_step`` is the
                              like-for-like ratio;
* ``propagated_alone``        Diff-In in its default form (``propagated``) as a job with ``scores.methods: [diffin]``
                              runs it: one pass at theta_t forming the projected gradient (the propagated terms are
                              dots with it) and TracIn's exact dots, no norms;
* ``propagated_all_methods``  the default job: the same pass with every method (features and exact norms);
* ``diffin_alone``            Diff-In in its ``exact_increment`` form as a job with ``scores.methods:
                              [diffin]`` and ``features.save: false`` runs it: targets ["target", "train"], one pass
                              at theta_t contracting with the directions (v_target, v_pred, u_target, u_train, G), no
                              projected features and no gradient norms (pruner.scorer.computed_quantities);
* ``diffin_all_methods``      the exact_increment job with every method: Diff-In, TracIn, OGA and baselines from that one
                              pass, which then also forms the projected features and the exact norms;
* ``taylor_alone``            Diff-In in the paper's ``taylor`` form, as ``diffin_alone``: central FD, midpoint base,
                              two FD passes;
* ``taylor_central``          the taylor form with every method of the job in the same two FD passes;
* ``taylor_central_exact_base`` the same with ``base_pass="exact"`` (an extra pass at theta_t);
* ``taylor_forward``          the same with the forward FD scheme (one FD pass);
* ``taylor_target_central``   targets ["target"] only, central FD;
* ``tracin``                  TracIn only: one engine pass with the v_target direction (exact dot; no features,
                              no norms);
* ``tracin_features``         one engine pass with the v_target direction, features and norms (what TracIn + OGA need).

The per-checkpoint shared quantities (bank embeddings, v, G, u = H_B v) are computed once before timing; their
cost is reported separately (``shared_seconds``), it does not grow with the pool.

Usage::

    python benchmarks/bench_diffin_cost.py --arch pruner-tiny --batch-size 32 --device cpu --repeats 5

Writes ``benchmarks/results/diffin_cost.json`` (``--out``): ``diffin_vs_train_step`` (time per sample of Diff-In
alone in the default form, ``diffin_alone``, divided by the time per sample of a train step; the goal is <= 2.5),
``diffin_all_methods_vs_train_step`` (every method of the default job in the same pass),
``diffin_taylor_vs_train_step`` (``taylor_alone``), ``tracin_vs_train_step``, ``model``, ``device`` and the details
of every variant.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_gradients as common  # noqa: E402  (also puts the repository root on sys.path)
import torch  # noqa: E402

ROOT = common.ROOT
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "diffin_cost.json"
VARIANTS = ("train_step", "train_step_trimmed", "propagated_alone", "propagated_all_methods", "diffin_alone",
            "diffin_all_methods", "taylor_alone", "taylor_central", "taylor_central_exact_base", "taylor_forward",
            "taylor_target_central", "tracin", "tracin_features")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="pruner-tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--k", type=int, default=1024, help="projection dimension of the base pass features")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per variant (median reported; >= 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="base-pass precision (FD passes always run in fp32; forward FD needs fp32)")
    p.add_argument("--bank-size", type=int, default=4096, help="negative bank K (embedded once per checkpoint)")
    p.add_argument("--target-size", type=int, default=64, help="target pairs for v_target (shared cost only)")
    p.add_argument("--reference-batches", type=int, default=1, help="R reference batches for G_B (shared cost only)")
    p.add_argument("--curvature-samples", type=int, default=512, help="the propagated form's curvature subsample "
                   "(shared cost only)")
    p.add_argument("--fd-eps", type=float, default=1e-2)
    p.add_argument("--hvp-eps", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be at least 5")
    return args


def main(argv=None) -> dict:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    from pruner.grads.engine import PerSampleGradients
    from pruner.io.atomic import write_json_atomic
    from pruner.scores.components import CheckpointScorer, strict_fp32
    from pruner.scores.shared import compute_shared

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    strict_fp32()
    device = common.resolve_device(args.device)
    model, tokenizer = common.build_model(args.arch, device)
    images, tokens = common.make_batch(model, tokenizer, args.batch_size, device, seed=1)

    def batches(n, seed, size):
        imgs, toks = common.make_batch(model, tokenizer, n, device, seed=seed)
        return [(imgs[i:i + size], toks[i:i + size]) for i in range(0, n, size)]

    engine = PerSampleGradients(model, k=args.k, precision=args.precision)
    t0 = time.perf_counter()
    shared = compute_shared(engine, index=0, step=1000, eta=1e-3, a_t=-1e-6,
                            bank_batches=batches(args.bank_size, 2, 256),
                            target_batches=batches(args.target_size, 3, args.batch_size),
                            reference_batches=batches(args.reference_batches * args.batch_size, 4, args.batch_size),
                            targets=["target", "train"], hvp_eps=args.hvp_eps, self_rank=0)
    common.sync(device)
    shared_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    prop_shared = compute_shared(engine, index=0, step=1000, eta=1e-3, a_t=-1e-6,
                                 bank_batches=batches(args.bank_size, 2, 256),
                                 target_batches=batches(args.target_size, 3, args.batch_size),
                                 reference_batches=batches(args.reference_batches * args.batch_size, 4,
                                                           args.batch_size),
                                 targets=["target", "train"], hvp_eps=args.hvp_eps, self_rank=0, form="propagated",
                                 curvature_batches=batches(args.curvature_samples, 5, args.batch_size), step_scale=30.0)
    common.sync(device)
    prop_shared_seconds = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    prop = {"prop_directions": {t: torch.randn(args.k, generator=g, dtype=torch.float64) for t in ("target", "train")},
            "prop_step": 1.0, "prop_weight": 1e-3}

    train = common.make_train_step(model, images, tokens, device, args.precision)
    both = ["target", "train"]
    taylor = dict(fd_eps=args.fd_eps, form="taylor")
    scorers = {
        "diffin_alone": CheckpointScorer(engine, shared, targets=both, features=False, norms=False),
        "diffin_all_methods": CheckpointScorer(engine, shared, targets=both),
        "taylor_alone": CheckpointScorer(engine, shared, targets=both, features=False, norms=False, **taylor),
        "taylor_central": CheckpointScorer(engine, shared, targets=both, **taylor),
        "taylor_central_exact_base": CheckpointScorer(engine, shared, targets=both, base_pass="exact", **taylor),
        "taylor_target_central": CheckpointScorer(engine, shared, targets=["target"], **taylor),
        "propagated_alone": CheckpointScorer(engine, prop_shared, targets=both, features=False, norms=False,
                                             form="propagated", **prop),
        "propagated_all_methods": CheckpointScorer(engine, prop_shared, targets=both, form="propagated", **prop),
    }
    if args.precision == "fp32":
        scorers["taylor_forward"] = CheckpointScorer(engine, shared, targets=both, fd_scheme="forward", **taylor)
    tracin_dir = engine.directions([shared.vectors["v_target"]])
    loss_fn = scorers["diffin_alone"].loss_fn()

    fns = {"train_step": train,
           "train_step_trimmed": common.make_train_step(model, images, tokens, device, args.precision, trim_text=True)}
    for name in VARIANTS:
        if name in scorers:
            fns[name] = (lambda s: (lambda: s(images, tokens)))(scorers[name])
    fns["tracin"] = lambda: engine.run(images, tokens, loss_fn, directions=tracin_dir, features=False, norms=False)
    fns["tracin_features"] = lambda: engine.run(images, tokens, loss_fn, directions=tracin_dir, features=True,
                                                norms=True)

    times = common.time_interleaved(fns, device, args.warmup, args.repeats)

    per_sample = {name: statistics.median(ts) / args.batch_size for name, ts in times.items()}
    base = per_sample["train_step"]
    variants = {name: {"times_s": ts, "median_s": statistics.median(ts), "per_sample_ms": 1e3 * per_sample[name],
                       "samples_per_s": 1.0 / per_sample[name], "vs_train_step": per_sample[name] / base}
                for name, ts in times.items()}
    for name, v in variants.items():
        print(f"{name:>22}: {v['per_sample_ms']:8.3f} ms/sample  x{v['vs_train_step']:.2f} train step", flush=True)

    report = {
        "diffin_vs_train_step": variants["propagated_alone"]["vs_train_step"],
        "diffin_all_methods_vs_train_step": variants["propagated_all_methods"]["vs_train_step"],
        "diffin_form": "propagated",
        "diffin_exact_increment_vs_train_step": variants["diffin_alone"]["vs_train_step"],
        "diffin_exact_increment_all_methods_vs_train_step": variants["diffin_all_methods"]["vs_train_step"],
        "propagated_vs_exact_increment_all_methods":
            variants["propagated_all_methods"]["median_s"] / variants["diffin_all_methods"]["median_s"],
        "propagated_shared_seconds": prop_shared_seconds,
        # issue 21's goal (<= 10% at 1e5 samples): a whole checkpoint's scoring time, per-sample passes plus the
        # shared phase, of the default job (propagated) over the same job in the exact_increment form
        "propagated_overhead_at_1e5_samples":
            (1e5 * per_sample["propagated_all_methods"] + prop_shared_seconds)
            / (1e5 * per_sample["diffin_all_methods"] + shared_seconds) - 1.0,
        "diffin_taylor_vs_train_step": variants["taylor_alone"]["vs_train_step"],
        "diffin_taylor_all_methods_vs_train_step": variants["taylor_central"]["vs_train_step"],
        "tracin_vs_train_step": variants["tracin"]["vs_train_step"],
        "diffin_vs_trimmed_train_step":
            variants["propagated_alone"]["median_s"] / variants["train_step_trimmed"]["median_s"],
        "diffin_taylor_vs_trimmed_train_step":
            variants["taylor_alone"]["median_s"] / variants["train_step_trimmed"]["median_s"],
        "diffin_taylor_forward_vs_train_step": variants.get("taylor_forward", {}).get("vs_train_step"),
        "diffin_taylor_exact_base_vs_train_step": variants["taylor_central_exact_base"]["vs_train_step"],
        "diffin_taylor_target_only_vs_train_step": variants["taylor_target_central"]["vs_train_step"],
        "tracin_with_features_vs_train_step": variants["tracin_features"]["vs_train_step"],
        "goal_diffin_vs_train_step": 2.5,
        "model": args.arch,
        "device": common.device_name(device),
        "device_type": device.type,
        "batch_size": args.batch_size,
        "k": args.k,
        "precision": args.precision,
        "bank_size": args.bank_size,
        "fd_eps": args.fd_eps,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "shared_seconds": shared_seconds,
        "shared_note": "bank embedding + v_target/v_pred + G_B + u_target + u_train (central FD HVPs), once per "
                       f"checkpoint; target {args.target_size} pairs, {args.reference_batches} reference batch(es)",
        "variants": variants,
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_diffin_cost.py", *argv]),
        "torch": torch.__version__,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": "time per sample = median batch time / batch size; ratios divide by the train step's time per "
                 "sample (forward + backward of the in-batch CLIP loss w.r.t. all parameters, no optimiser step). "
                 "diffin_* and taylor_* = CheckpointScorer.__call__. diffin_*: Diff-In's default exact_increment "
                 "form, one pass at theta_t (5 directional dots). taylor_*: the paper's form, the FD passes along "
                 "G (5 directional dots each), plus a base pass at theta_t for the exact-base and forward "
                 "variants. *_alone forms no features and no norms (a job with scores.methods [diffin], "
                 "features.save false); the others form both, as the default job does.",
    }
    write_json_atomic(args.out, report)
    print(f"diffin_vs_train_step: {report['diffin_vs_train_step']:.3f} (goal <= 2.5; Diff-In alone, propagated form)")
    print(f"propagated_vs_exact_increment_all_methods: {report['propagated_vs_exact_increment_all_methods']:.3f}")
    print(f"propagated_overhead_at_1e5_samples: {report['propagated_overhead_at_1e5_samples']:+.3%} (goal <= 10%)")
    print(f"diffin_all_methods_vs_train_step: {report['diffin_all_methods_vs_train_step']:.3f}")
    print(f"diffin_taylor_vs_train_step: {report['diffin_taylor_vs_train_step']:.3f}")
    print(f"diffin_vs_trimmed_train_step: {report['diffin_vs_trimmed_train_step']:.3f}")
    print(f"tracin_vs_train_step: {report['tracin_vs_train_step']:.3f}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
