"""End-to-end service benchmark at a size that exercises it: ``pruner prune`` through Ray on 100,000+ real pairs.

    .venv/bin/python benchmarks/bench_e2e.py                      # 25k and 100k samples, the recorded run
    .venv/bin/python benchmarks/bench_e2e.py --sizes 5000 --out /tmp/e2e.json   # a quick check

Pool: the 50,000 CIFAR-10 training images of ../shared/data, each twice (the original JPEG bytes, and the image
mirrored left-right and re-encoded), with a caption built from its class by one of the dataset's templates
(another template for the mirrored copy) and a DataComp-style hex json uid: 100,000 distinct pairs in 400 shards of
250 (``--per-shard``). A run of size N uses the first N / 250 shards. The target set: the first 512 test pairs.

Proxy: ``pruner train-proxy`` (pruner-micro, ``--steps`` steps, 4 evenly spaced checkpoints) on the first shards,
trained once and reused. Job: the default methods with Diff-In's self target as well
(``scores.diffin.targets: [target, train, self]``), the default bank (4096) and k (1024), 2 CPU actors.

Each size runs ``pruner prune --config`` in a fresh process (a private local Ray), while a sampler polls every
0.2 s: the resident set (RSS) and unique set (USS) of the driver process, of each ``ray::ShardScorer`` /
``ray::SharedComputer`` worker, and the bytes in use in /dev/shm (Ray's object store). Recorded per size: wall
time, the phases from summary.json (shared quantities, actor start-up, scoring, reduce), samples/s of the scoring
phase, the peaks, the output sizes, and whether every sample was scored exactly once (the ranking's uids are the
pool's, each once). Results: ``--out`` (keys named by issue 20), a table on stdout.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
OUT = ROOT / "benchmarks" / "results" / "e2e.json"


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def build_pool(out: Path, per_shard: int, data: Path) -> int:
    """Write the 100,000-pair pool (module docstring) once; returns the number of shards."""
    done = out / "DONE"
    if done.exists():
        return int(done.read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality_lib as ql
    meta = ql.load_classnames(data)
    names, templates = meta["classnames"], meta["templates"]
    train = ql.read_split(data, "train")
    pairs = []
    for i, s in enumerate(train):
        name = names[s.label]
        art = "an" if name[0] in "aeiou" else "a"
        for copy in (0, 1):
            jpg = s.jpg
            if copy:
                buf = io.BytesIO()
                Image.open(io.BytesIO(s.jpg)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, "JPEG", quality=90)
                jpg = buf.getvalue()
            caption = templates[(i + 3 * copy) % len(templates)].format(art=art, name=name)
            uid = f"{(2 * i + copy) * 0x9E3779B97F4A7C15 % 2**128:032x}"
            pairs.append((f"e2e-{2 * i + copy:06d}", jpg, caption, uid, s.label))
    order = np.random.default_rng(0).permutation(len(pairs))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    n_shards = len(pairs) // per_shard
    for j in range(n_shards):
        with tarfile.open(out / f"e2e-{j:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in order[j * per_shard:(j + 1) * per_shard]:
                key, jpg, caption, uid, label = pairs[i]
                _tar_add(tf, f"{key}.jpg", jpg)
                _tar_add(tf, f"{key}.txt", caption.encode())
                _tar_add(tf, f"{key}.json", json.dumps({"uid": uid, "label": label}).encode())
    done.write_text(str(n_shards))
    return n_shards


class Sampler(threading.Thread):
    """Peak RSS / USS of a process tree's driver and Ray workers, and /dev/shm bytes in use, every ``every`` s."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.stop = threading.Event()
        self.driver = {"rss": 0, "uss": 0}
        self.workers: dict[int, dict] = {}
        self.shm0 = shutil.disk_usage("/dev/shm").used
        self.shm_peak = 0

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    title = " ".join(p.cmdline())[:60]
                    mem = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if p.pid == self.pid:
                    rec = self.driver
                elif title.startswith(("ray::ShardScorer", "ray::SharedComputer")):
                    rec = self.workers.setdefault(p.pid, {"kind": title.split()[0].split(".")[0], "rss": 0, "uss": 0})
                else:
                    continue
                rec["rss"], rec["uss"] = max(rec["rss"], mem.rss), max(rec["uss"], mem.uss)
            self.shm_peak = max(self.shm_peak, shutil.disk_usage("/dev/shm").used - self.shm0)
            time.sleep(self.every)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
        (path.stat().st_size if path.exists() else 0)


def run_size(a, n: int, pool_dir: Path, traj: Path, work: Path) -> dict:
    shards = sorted(pool_dir.glob("e2e-*.tar"))[: n // a.per_shard]
    run_dir = work / f"run-{n}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "pool").mkdir(parents=True)
    for s in shards:  # a folder per size, so the job's shard spec is a directory (as a user gives it)
        os.symlink(s, run_dir / "pool" / s.name)
    cfg = {"name": f"e2e-{n}", "output_dir": str(run_dir / "jobs"), "seed": 0,
           "data": {"shards": [str(run_dir / "pool")]},
           "target": {"shards": [str(Path(a.data_dir) / "test" / "cifar10-test-000000.tar.gz")], "max_samples": 512},
           "model": {"arch": a.arch}, "trajectory": {"file": str(traj)},
           "scores": {"diffin": {"targets": ["target", "train", "self"]}},
           "ray": {"num_actors": a.actors, "cpus_per_actor": 1}}
    (run_dir / "job.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    with open(run_dir / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pruner.jobs.prune", "--config", str(run_dir / "job.yaml")],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = Sampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"size {n}: pruner prune exited {rc}; see {run_dir / 'driver.log'}")
    job = next((run_dir / "jobs").iterdir())
    summary = json.loads((job / "summary.json").read_text())
    import pyarrow.parquet as pq
    uids = pq.read_table(job / "ranking.parquet", columns=["uid"])["uid"].to_pylist()
    expected = n - summary["counts"]["rejected"]
    run = summary["run"]
    shared = sorted((job / "shared").glob("ckpt-*.pt"))
    mb = 1 / 2**20
    res = {"samples": n, "shards": len(shards), "wall_seconds": wall,
           "shared_seconds": run["shared_seconds"], "actor_start_seconds": run.get("actor_start_seconds"),
           "score_seconds": run["score_seconds"], "reduce_seconds": summary["reduce_seconds"],
           "samples_per_second": run["samples_scored_this_run"] / run["score_seconds"],
           "samples_per_second_wall": n / wall, "shared_fraction": run["shared_seconds"] / wall,
           "driver_peak_rss_mb": sampler.driver["rss"] * mb, "driver_peak_uss_mb": sampler.driver["uss"] * mb,
           "actor_peak_rss_mb": sorted(w["rss"] * mb for w in sampler.workers.values() if w["kind"] == "ray::ShardScorer"),
           "actor_peak_uss_mb": sorted(w["uss"] * mb for w in sampler.workers.values() if w["kind"] == "ray::ShardScorer"),
           "shared_actor_peak_rss_mb": max([w["rss"] * mb for w in sampler.workers.values()
                                            if w["kind"] == "ray::SharedComputer"] or [0]),
           "object_store_peak_mb": sampler.shm_peak * mb,
           "max_shared_state_mb_per_checkpoint": max(p.stat().st_size for p in shared) * mb,
           "checkpoints": len(shared),
           "output_mb": {"shards_dir": du(job / "shards") * mb, "shared": du(job / "shared") * mb,
                         "ranking": du(job / "ranking.parquet") * mb, "keep": du(job / "keep") * mb},
           "scored_exactly_once": len(uids) == len(set(uids)) == expected == summary["counts"]["samples"],
           "rejected": summary["counts"]["rejected"], "kept": summary["counts"]["kept"]}
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA), help="the CIFAR-10 layout of ../shared/data/cifar10")
    ap.add_argument("--sizes", default="25000,100000")
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--work", default="/tmp/pruner-e2e")
    ap.add_argument("--arch", default="pruner-micro")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    work = Path(a.work)
    t0 = time.time()
    n_shards = build_pool(work / "pool", a.per_shard, Path(a.data_dir))
    print(f"pool: {n_shards} shards of {a.per_shard} in {work / 'pool'} ({time.time() - t0:.0f} s)", flush=True)
    traj = work / "proxy" / "trajectory.json"
    if not traj.exists():
        from pruner.train.proxy import train_proxy
        train_proxy([str(p) for p in sorted((work / "pool").glob("e2e-*.tar"))[:20]], str(traj.parent), arch=a.arch,
                    steps=a.steps, batch_size=32, checkpoints=4, seed=0, device="cpu")
    runs = [run_size(a, int(n), work / "pool", traj, work) for n in a.sizes.split(",")]
    big = max(runs, key=lambda r: r["samples"])
    small = min(runs, key=lambda r: r["samples"])
    res = {**big, "driver_peak_rss_mb_25k": small["driver_peak_rss_mb"], "runs": runs,
           "driver_rss_ratio": big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"],
           "goals": {"driver_rss_within_10pct": abs(big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"] - 1) <= 0.1,
                     "shared_under_10pct": big["shared_fraction"] < 0.1,
                     "every_sample_once": all(r["scored_exactly_once"] for r in runs)},
           "command": " ".join([".venv/bin/python", "benchmarks/bench_e2e.py"] + (argv or sys.argv[1:])),
           "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    from pruner.io.atomic import write_json_atomic
    write_json_atomic(a.out, res)
    print(json.dumps(res["goals"]), f"driver RSS {small['driver_peak_rss_mb']:.0f} -> {big['driver_peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
