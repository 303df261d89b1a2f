"""Re-target throughput: samples/s of the matrix-vector pass `pruner rescore --target` runs over stored fp16
features (pruner.rescore._projected_dot: [n, k] fp16 memory map @ [k, 2] per checkpoint).

Writes benchmarks/results/rescore.json with `samples_per_second` (median over repeats, page cache warm).
Usage: python benchmarks/bench_rescore.py [--n 2000000] [--k 1024] [--repeats 5] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pruner.io.atomic import write_json_atomic  # noqa: E402
from pruner.io.store import save_features  # noqa: E402
from pruner.rescore import _projected_dot  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rescore.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        path = Path(d) / "feats.npy"
        rng = np.random.default_rng(0)
        feats = np.empty((a.n, a.k), np.float16)
        for s in range(0, a.n, 1 << 18):
            feats[s:s + (1 << 18)] = rng.standard_normal((min(1 << 18, a.n - s), a.k), np.float32)
        save_features(path, feats)
        del feats
        vec = torch.randn(a.k, 2, device=a.device)
        _projected_dot(path, vec)  # warm the page cache
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            _projected_dot(path, vec)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    result = {"samples_per_second": a.n / med, "n": a.n, "k": a.k, "median_seconds": med, "seconds": times,
              "device": a.device, "threads": a.threads, "goal_samples_per_second": 5_000_000,
              "command": "python " + " ".join(sys.argv),
              "note": "one checkpoint's pass (2 target vectors); a job with m checkpoints (and hzg) does m (2m) passes"}
    write_json_atomic(a.out, result)
    print(result)


if __name__ == "__main__":
    main()
