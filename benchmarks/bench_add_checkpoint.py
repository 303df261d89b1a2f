"""Benchmark ``pruner rescore --add-checkpoint`` against a full re-run over the longer trajectory.

    .venv/bin/python benchmarks/bench_add_checkpoint.py --repeats 3

Data and model as benchmarks/bench_service.py (its cached 3-checkpoint pruner-micro proxy trajectory; ``--shards``
shards of the shared CIFAR-10 train set, ``--per-shard`` samples each; k = 128; every method). One private local
Ray instance (``--num-cpus``) serves every run, with ``--actors`` CPU actors. A job over the first two checkpoints is
scored once; then, alternating in each repeat: (full) a fresh job over all three checkpoints; (extension)
:func:`pruner.rescore.add_checkpoint` of the third checkpoint to the two-checkpoint job, its output directory
removed before each repeat. Both runs compute their shared quantities (the full run for three checkpoints, the
extension for one) and fit the OGA forest.

Measured per run: wall seconds of the whole call (job set-up, shared quantities, actor start-up, scoring, reduce)
and the driver's ``score_seconds`` (the scoring phase alone). Medians over ``--repeats``; ratio = extension / full
(an extension computes one checkpoint of three, so about 1/3 of the gradient work, plus reading each shard's stored
score table and linking the stored features). The extension's scores are checked against the full run's
(rtol 1e-9), so the benchmark also fails if they differ. Results go to ``benchmarks/results/rescore.json``
under ``add_checkpoint`` (read-modify-write, atomic; other keys left as they are).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# bench_service also sets Ray's environment variables
from bench_service import add_cluster_args, bench_cluster, job_config  # noqa: E402

from pruner.io.atomic import update_json_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "rescore.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_args(ap)
    ap.add_argument("--actors", type=int, default=2)
    args = ap.parse_args(argv)

    import logging

    import numpy as np
    import pyarrow.parquet as pq

    from pruner.config import load_config
    from pruner.jobs.prune import run
    from pruner.model.checkpoints import load_trajectory, save_trajectory
    from pruner.rescore import add_checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def timed(call) -> tuple[Path, dict]:
        """Run ``call`` (returning a finished job directory); (that directory, its timing record)."""
        load0, t0 = os.getloadavg()[0], time.time()
        job_dir = call()
        wall = time.time() - t0
        st = json.loads((job_dir / "summary.json").read_text())["run"]
        return job_dir, {"wall_seconds": wall, "score_seconds": st["score_seconds"],
                         "loadavg_1m_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}

    runs: dict[str, list[dict]] = {"full": [], "extension": []}
    with bench_cluster(args, "bench_addck-") as (workdir, shards, traj_file):
        traj = load_trajectory(file=str(traj_file))
        short = save_trajectory(replace(traj, checkpoints=traj.checkpoints[:2]), workdir / "first-two.json")
        last = traj.checkpoints[2]

        def job(out: Path, trajectory_file: Path) -> Path:
            cfg = load_config(data=job_config(out, trajectory_file, shards, args.per_shard, args.actors))
            status, summary = run(cfg)
            if status:
                raise SystemExit(f"job failed: {summary}")
            return Path(cfg.output_dir) / summary["job"]

        prior = job(workdir / "jobs" / "prior", short)
        for rep in range(args.repeats):
            out = workdir / "jobs" / f"full-r{rep}"
            shutil.rmtree(out, ignore_errors=True)
            full_dir, rec = timed(lambda: job(out, traj_file))
            runs["full"].append(rec)
            for p in prior.parent.iterdir():  # the extension's job directory, from the last repeat
                if p.is_dir() and p != prior:
                    shutil.rmtree(p)
            ext, rec = timed(lambda: add_checkpoint(prior, last.path, step=last.step, lr=last.lr,
                                                    lr_mean=last.lr_mean))
            runs["extension"].append(rec)
            a, b = (pq.read_table(d / "ranking.parquet").to_pandas().set_index("uid").sort_index()
                    for d in (ext, full_dir))
            for c in ("diffin_target", "tracin_target", "tracin_self", "oga_iforest"):
                np.testing.assert_allclose(a[c].values, b[c].values, rtol=1e-9, err_msg=c)
            print(json.dumps({"repeat": rep, "full": runs["full"][-1], "extension": runs["extension"][-1]}),
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_seconds", "score_seconds")}
           for k, v in runs.items()}
    details = {
        "what": "pruner rescore --add-checkpoint (3rd checkpoint onto a 2-checkpoint job) vs a full job over the 3 "
                "checkpoints, same data, alternating; wall = the whole call, score_seconds = the scoring phase",
        "command": "cd /work/main && .venv/bin/python benchmarks/bench_add_checkpoint.py "
                   + " ".join(argv or sys.argv[1:]),
        "data": f"{args.shards} shards of shared/data/cifar10/train x {args.per_shard} samples",
        "model": "pruner-micro, k=128, methods diffin+tracin+oga+baselines",
        "actors": args.actors, "ray_num_cpus": args.num_cpus, "repeats": args.repeats, "runs": runs,
        "median": med,
        "extension_vs_full_wall": round(med["extension"]["wall_seconds"] / med["full"]["wall_seconds"], 3),
        "extension_vs_full_score": round(med["extension"]["score_seconds"] / med["full"]["score_seconds"], 3),
        "scores_equal_full_run_rtol": 1e-9,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(details, indent=2))
    if not args.no_write:
        update_json_atomic(RESULTS, {"add_checkpoint": details})
        print(f"merged into {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
