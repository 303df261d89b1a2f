"""Re-target throughput of `pruner rescore --target`: samples/s of pruner.rescore.retarget_shard, the per-shard
pass the command runs once the target vectors are known, over n synthetic samples in shards of --shard-size and
one checkpoint (per shard fp16 features [rows, k] = P g_z and, for Diff-In, [rows, k] = P H_z G_B).

Side by side in one run, for each thread count (torch.set_num_threads, as the CLI process would have it), repeats
interleaved, page cache warm (one untimed pass first), medians:
  * diffin+tracin+pred int8: a job with the default methods, P g_z @ [P v', P u', P v'_pred] (diffin_target in the
    exact_increment form, tracin_target, tracin_pred) over the features' int8 copy (1 KiB read per sample at
    k=1024), already built: what `pruner rescore --target` does by default from its second run on; the headline;
  * first re-target int8: the same with the int8 copies removed before each pass, so it makes them from the fp16
    files (quantized in memory, written by background threads: what the first re-target of a job costs);
  * diffin+tracin+pred fp16: the same pass over the fp16 features (one file, 2 KiB per sample; --precision fp16);
  * diffin+tracin: fp16, without tracin_pred, P g_z @ [P v', P u'];
  * diffin(taylor)+tracin: the paper's taylor form, P g_z @ [P v', P u'] and P H_z G_B @ P v' (two files, 4 KiB);
  * tracin only (a job without Diff-In): P g_z @ P v' (one file, 2 KiB per sample);
  * read only: an int64 sum over the same two files, i.e. the memory bandwidth a pass that computes nothing gets
    here, and so the ceiling for the taylor row (4 KiB per sample); the 2 KiB rows can go up to twice as fast.
Writes benchmarks/results/rescore.json (`samples_per_second`: the headline at the best thread count).
Usage: python benchmarks/bench_rescore.py [--n 1000000] [--shard-size 10000] [--k 1024] [--repeats 5]
                                          [--threads 1 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pruner.io.atomic import update_json_atomic  # noqa: E402
from pruner.io.layout import JobLayout  # noqa: E402
from pruner.io.store import Int8Copies, save_features  # noqa: E402
from pruner.rescore import retarget_shard  # noqa: E402


def write_shards(layout: JobLayout, urls: list[str], rows: int, k: int) -> None:
    """Random N(0, 1) fp16 features and hzg [rows, k] for checkpoint 0 of each shard."""
    layout.shards_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for url in urls:
        for path in (layout.features(url, 0), layout.hzg(url, 0)):
            save_features(path, rng.standard_normal((rows, k), np.float32))


HEADLINE = "diffin+tracin+pred int8"  # the pass a job with the default scores.methods runs, by default


def read_only(layout: JobLayout, urls: list[str]) -> None:
    for url in urls:
        for path in (layout.features(url, 0), layout.hzg(url, 0)):
            torch.from_numpy(np.load(path, mmap_mode="c")).view(torch.int64).sum()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (DataComp: about 10k)")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rescore.json"))
    a = ap.parse_args()
    urls = [f"bench://shard-{i:06d}.tar" for i in range(max(1, a.n // a.shard_size))]
    n = len(urls) * a.shard_size
    g = torch.Generator().manual_seed(0)
    projs = [{"Pv": torch.randn(a.k, generator=g).to(a.device), "Pu": torch.randn(a.k, generator=g).to(a.device),
              "eta": 0.5, "a_t": 0.25, "b_t": 0.125}]
    with_pred = [{**p, "Pp": torch.randn(a.k, generator=g).to(a.device)} for p in projs]  # tracin_pred's P v'_pred

    def retarget_all(form, vectors=projs, precision="fp16"):
        def run(lay):
            # as pruner.rescore.retarget: the writes of new copies are waited for
            with Int8Copies(lay.int8_dir) if precision == "int8" else contextlib.nullcontext() as int8:
                return [retarget_shard(lay, u, a.shard_size, vectors, form, int8) for u in urls]
        return run

    def first_retarget(lay):
        shutil.rmtree(lay.int8_dir, ignore_errors=True)
        retarget_all("exact_increment", with_pred, "int8")(lay)

    # (pass, bytes read per sample in units of 2 k: fp16 files read) -- the first re-target reads the fp16 file
    # once to build the copy and the copy once
    passes = {"diffin+tracin+pred int8": (retarget_all("exact_increment", with_pred, "int8"), 0.5),
              "first re-target int8": (first_retarget, 1.5),
              "diffin+tracin+pred fp16": (retarget_all("exact_increment", with_pred), 1),
              "diffin+tracin": (retarget_all("exact_increment"), 1),
              "diffin(taylor)+tracin": (retarget_all("taylor"), 2),
              "tracin only": (retarget_all(None), 1),
              "read only": (lambda lay: read_only(lay, urls), 2)}
    times: dict[tuple[str, int], list[float]] = {}
    load = [os.getloadavg()[0]]  # the machine is shared: other processes' load during the run
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        layout = JobLayout(Path(d))
        write_shards(layout, urls, a.shard_size, a.k)
        for t in a.threads:
            torch.set_num_threads(t)
            for fn, _ in passes.values():
                fn(layout)  # warm the page cache
        for _ in range(a.repeats):
            for t in a.threads:
                torch.set_num_threads(t)
                for name, (fn, _) in passes.items():
                    t0 = time.perf_counter()
                    fn(layout)
                    if a.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times.setdefault((name, t), []).append(time.perf_counter() - t0)
    load.append(os.getloadavg()[0])
    rows = {name: {str(t): {"samples_per_second": n / statistics.median(times[name, t]),
                            "bytes_read_per_second": files * n * a.k * 2 / statistics.median(times[name, t]),
                            "seconds": times[name, t]} for t in a.threads}
            for name, (_, files) in passes.items()}
    best = max(a.threads, key=lambda t: rows[HEADLINE][str(t)]["samples_per_second"])
    result = {"samples_per_second": rows[HEADLINE][str(best)]["samples_per_second"], "threads": best,
              "goal_samples_per_second": 5_000_000, "n": n, "shard_size": a.shard_size, "k": a.k,
              "repeats": a.repeats, "device": a.device, "cpu_count": os.cpu_count(),
              "load_average_1min_before_after": load, "passes": rows, "command": "python " + " ".join(sys.argv),
              "note": "one checkpoint (a job with m checkpoints does m such passes per shard); "
                      f"samples_per_second is {HEADLINE}: what `pruner rescore --target` computes by default for "
                      "a job with the default methods (diffin_target in the exact_increment form, tracin_target and "
                      "tracin_pred: three dots per row of the features' int8 copy, 1 KiB per sample at k=1024, the "
                      "copy already built); 'first re-target int8' builds the copy first; the fp16 rows read the "
                      "features themselves (2 KiB); diffin(taylor)+tracin also reads hzg (4 KiB); "
                      "'read only' is an int64 sum over the same files: the memory-bandwidth ceiling here"}
    update_json_atomic(a.out, result)  # bench_add_checkpoint.py's add_checkpoint key stays
    print(f"{'pass':22s}" + "".join(f"{f'{t} thread(s): samples/s, GB/s':>36s}" for t in a.threads))
    for name, row in rows.items():
        print(f"{name:22s}" + "".join(f"{row[str(t)]['samples_per_second']:>24,.0f} "
                                      f"{row[str(t)]['bytes_read_per_second'] / 1e9:>10.2f}" for t in a.threads))


if __name__ == "__main__":
    main()
