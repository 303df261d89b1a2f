"""Which target-free statistic should the default pipeline filter and rank by: the proxy's CLIP score or its loss?

    .venv/bin/python benchmarks/filter_statistic.py --seeds 10-19 --out benchmarks/results/filter_statistic.json

The mismatch problem of ``benchmarks/quality.py`` (CIFAR-10 train pool of ``--pool-size`` pairs, 20% of captions
swapped across classes, a pruner-micro proxy trained from scratch with pruner's train-proxy), many seeds, cheap per
seed: no gradients, only the proxy's embeddings at each of its checkpoints. Per seed, for the CLIP score cos(x, y)
and the bank loss (pruner.model.loss.bank_loss against ``--bank-size`` pool pairs, the pair's own bank row left out,
the checkpoint's logit scale; as the scorer computes ``baseline_loss``, except that the bank is a seeded uniform draw
from the pool and 1,024 pairs as in benchmarks/quality.py, not the product's hash-picked 4,096):

- detection AUROC of swapped pairs at the last checkpoint, and of the mean over checkpoints (the area under the
  margin / dataset-cartography idea: mislabelled samples are learnt late, so their statistic stays low over training);
- with ``--coresets``: the top 50% / 30% by each statistic at the last checkpoint, retrained from scratch with the
  proxy's seed and steps, zero-shot top-1 on the CIFAR-10 test split, and the swapped share kept.

Paired differences (loss − CLIP score) over the seeds with their standard error: the question is whether either
statistic is the better filter beyond the seed-to-seed noise. Cached per seed and settings under ``--work-dir``.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import quality_lib as ql  # noqa: E402

STATISTICS = ("clip_score", "loss")


def parse_seeds(text: str) -> list[int]:
    """"10-19" or "0,3,5" -> seeds."""
    if "-" in text:
        lo, hi = map(int, text.split("-"))
        return list(range(lo, hi + 1))
    return [int(s) for s in text.split(",")]


@torch.no_grad()
def statistics(model, images: torch.Tensor, tokens: torch.Tensor, bank: np.ndarray) -> dict[str, np.ndarray]:
    """CLIP score and -bank loss ([n] each, higher = keep) of every pool pair under ``model``; ``bank``: the pool
    rows of the bank pairs (each bank pair's own row is left out of its negatives)."""
    from pruner.model.loss import bank_loss, logit_scale_of
    x, y = ql._encode(model, images=images).double(), ql._encode(model, tokens=tokens).double()
    own = torch.full((len(x),), -1, dtype=torch.int64)
    own[torch.from_numpy(bank)] = torch.arange(len(bank))
    loss = bank_loss(x, y, x[bank], y[bank], logit_scale_of(model), own)
    return {"clip_score": (x * y).sum(-1).numpy(), "loss": -loss.numpy()}


def run_seed(a, seed: int, train, ev) -> dict:
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from pruner.model.clip import create_clip
    settings = {k: getattr(a, k) for k in ("data_dir", "train_shards", "pool_size", "noise", "arch", "steps",
                                            "batch_size", "lr", "checkpoints", "bank_size", "keep", "coresets",
                                            "test_shards")}
    # a run with other settings never reuses this one
    seed_dir = Path(a.work_dir) / f"seed-{seed}-{ql.settings_hash(settings)}"
    done = seed_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    prob = ql.build_problem(train, a.pool_size, 0, a.noise, seed, 10)
    train_kw = dict(arch=a.arch, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=seed, device="cpu",
                    log_every=10 ** 9)
    ql.train_run(seed_dir / "proxy", prob.pool, checkpoints=a.checkpoints, **train_kw)
    _, preprocess, tokenizer = create_clip(a.arch)
    images = torch.stack([preprocess(Image.open(io.BytesIO(s.jpg)).convert("RGB")) for s in prob.pool])
    tokens = tokenizer([s.caption for s in prob.pool])
    bank = np.sort(np.random.default_rng(1000 + seed).choice(len(prob.pool), a.bank_size, replace=False))
    doc = json.loads((seed_dir / "proxy" / "trajectory.json").read_text())
    per_ckpt = [statistics(ql.load_model(str(seed_dir / "proxy" / c["path"]), a.arch, "cpu"), images, tokens, bank)
                for c in doc["checkpoints"]]
    clean = ~prob.swapped
    res = {"seed": seed, "steps": [c.get("step") for c in doc["checkpoints"]],
           "auroc": {s: float(roc_auc_score(clean, per_ckpt[-1][s])) for s in STATISTICS},
           "auroc_per_checkpoint": {s: [float(roc_auc_score(clean, c[s])) for c in per_ckpt] for s in STATISTICS},
           "auroc_trajectory_mean": {s: float(roc_auc_score(clean, np.mean([c[s] for c in per_ckpt], 0)))
                                     for s in STATISTICS},
           "zero_shot": {}, "swapped_kept": {}}
    if a.coresets:
        res["zero_shot"]["full"] = ql.evaluate(ql.load_model(ql.last_checkpoint(seed_dir / "proxy"), a.arch, "cpu"),
                                               ev, "cpu")["zero_shot"]
        for frac in a.keep:
            for s in STATISTICS:
                keep = ql.rank_order(per_ckpt[-1][s], prob.keys)[: int(round(frac * len(prob.pool)))]
                rd = seed_dir / f"{s}_keep_{frac}"
                ql.train_run(rd, [prob.pool[i] for i in keep], checkpoints=1, **train_kw)
                model = ql.load_model(ql.last_checkpoint(rd), a.arch, "cpu")
                res["zero_shot"][f"{s}:keep_{frac}"] = ql.evaluate(model, ev, "cpu")["zero_shot"]
                res["swapped_kept"][f"{s}:keep_{frac}"] = float(prob.swapped[keep].mean())
                ql.drop_optimizer_state(rd)
    ql.write_json(done, res)
    return res


def paired(values: list[float]) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None,
            "wins": int((v > 0).sum()), "n": len(v)}


def summarize(per_seed: list[dict], keep: list[float]) -> dict:
    out = {"auroc": {s: float(np.mean([r["auroc"][s] for r in per_seed])) for s in STATISTICS},
           "auroc_trajectory_mean": {s: float(np.mean([r["auroc_trajectory_mean"][s] for r in per_seed]))
                                     for s in STATISTICS},
           "loss_minus_clip_score": {"auroc": paired([r["auroc"]["loss"] - r["auroc"]["clip_score"]
                                                      for r in per_seed])},
           "trajectory_mean_minus_last": {s: paired([r["auroc_trajectory_mean"][s] - r["auroc"][s]
                                                     for r in per_seed]) for s in STATISTICS}}
    if all(r["zero_shot"] for r in per_seed):
        for frac in keep:
            k = f"keep_{frac}"
            out.setdefault("zero_shot", {})[k] = {s: float(np.mean([r["zero_shot"][f"{s}:{k}"] for r in per_seed]))
                                                  for s in STATISTICS}
            out.setdefault("swapped_kept", {})[k] = {
                s: float(np.mean([r["swapped_kept"][f"{s}:{k}"] for r in per_seed])) for s in STATISTICS}
            out["loss_minus_clip_score"][f"zero_shot_{k}"] = paired(
                [100 * (r["zero_shot"][f"loss:{k}"] - r["zero_shot"][f"clip_score:{k}"]) for r in per_seed])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--train-shards", type=int, default=0, help="read only this many train shards (0: all)")
    p.add_argument("--test-shards", type=int, default=0, help="evaluate on this many test shards (0: all)")
    p.add_argument("--seeds", default="10-19", help="a range lo-hi or a comma list")
    p.add_argument("--work-dir", default="runs/filter-statistic")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "filter_statistic.json"))
    p.add_argument("--pool-size", type=int, default=5000)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--arch", default="pruner-micro")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpoints", type=int, default=6, help="proxy checkpoints, evenly spaced (the last = --steps)")
    p.add_argument("--bank-size", type=int, default=1024)
    p.add_argument("--keep", default="0.5,0.3")
    p.add_argument("--coresets", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    a.keep = [float(f) for f in a.keep.split(",")]
    torch.set_num_threads(a.threads)
    data = Path(a.data_dir)
    train = ql.read_split(data, "train", a.train_shards)
    ev = ql.EvalSet(a.arch, ql.read_split(data, "test", a.test_shards), ql.load_classnames(data), np.arange(100)) \
        if a.coresets else None
    per_seed, t0 = [], time.time()
    seeds = parse_seeds(a.seeds)
    for i, seed in enumerate(seeds):
        per_seed.append(run_seed(a, seed, train, ev))
        r = per_seed[-1]
        print(f"[{i + 1}/{len(seeds)}] seed {seed}: AUROC clip {r['auroc']['clip_score']:.4f} loss "
              f"{r['auroc']['loss']:.4f}; zero-shot {json.dumps(r['zero_shot'])} ({time.time() - t0:.0f} s)",
              flush=True)
    result = {"summary": summarize(per_seed, a.keep), "per_seed": per_seed,
              "config": {k: v for k, v in vars(a).items() if k not in ("out", "work_dir")},
              "command": " ".join([".venv/bin/python", "benchmarks/filter_statistic.py"] + (argv or sys.argv[1:])),
              "wall_time_s": time.time() - t0}
    ql.write_json(Path(a.out), result)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
