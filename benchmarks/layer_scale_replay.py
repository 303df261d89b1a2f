"""The default pipeline of a finished target-aware run replayed with Diff-In's step scale over the sketched layers (the
default since stop 33), from the run's stored features, for runs too slow to score again (the pruner-tiny proxy):

    .venv/bin/python benchmarks/layer_scale_replay.py --runs W:RUN_JSON ... --run-args '--proxy-arch pruner-tiny'

W is a quality_target.py work dir (its seeds' proxies, jobs and retraining cache), RUN_JSON the run's result file.
Per seed the scales come from the proxy checkpoints' optimiser state through the product's own function
(pruner.model.checkpoints.optimizer_step_scale, the scorer's parameter names and sketched layers); per problem
diffin_target is formed again from the job's stored features with them (benchmarks/step_scale.py ``job_scores``:
propagation_terms, one dot per checkpoint, as ``pruner rescore`` does), the default pipeline selects
(quality_lib.pipeline_score) and each coreset is retrained as the run did (its cache). Paired with the run's default
(``default_score``, the all-parameter scale) and its best baseline. ``--basis all`` turns it round for a run scored
since stop 33: the replay uses the all-parameter scale (optimizer_step_scale without names) and pairs it with the
run's layer-scale default. A replay reads float16 features, so a few pairs at the cut can differ from a job scored
again (RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import quality_lib as ql  # noqa: E402
import quality_target as qt  # noqa: E402
from step_scale import job_scores, propagated_job  # noqa: E402


def layer_scales(traj_path: Path, basis: str = "layers") -> list[float]:
    """Each checkpoint's step scale over the sketched layers, as the scorer computes it; with ``basis`` "all", over
    every parameter (the default until stop 33)."""
    from pruner.grads.engine import PerSampleGradients
    from pruner.model.checkpoints import load_scoring_model, load_trajectory, optimizer_step_scale
    from pruner.model.clip import create_clip, open_clip_name
    traj = load_trajectory(file=str(traj_path))
    model = create_clip(traj.arch)[0]
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    layers = {open_clip_name(n) for n in PerSampleGradients(load_scoring_model(traj.checkpoints[0], traj.arch),
                                                            k=32, layer_k=4).params()}
    out = []
    for ck in traj.checkpoints:
        scale, got = optimizer_step_scale(ck.path, params, layers) if basis == "layers" else \
            optimizer_step_scale(ck.path)
        if got != basis:
            raise ValueError(f"{ck.path}: its optimiser state gave basis {got!r}, not {basis!r}")
        out.append(scale)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="W:RUN_JSON per work dir")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--run-args", default="", help="the runs' own quality_target.py settings")
    p.add_argument("--filter-fraction", type=float, default=0.2)
    p.add_argument("--niche-alpha", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--basis", choices=("layers", "all"), default="layers", help="the replayed scale: over the "
                   "sketched layers (a run scored before stop 33 against it), or over every parameter (a run scored "
                   "since, with the layer scale, against the scale before)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = Path(a.data_dir)
    train, test, classnames = ql.read_split(data, "train"), ql.read_split(data, "test"), ql.load_classnames(data)
    keeps = ("keep_0.3", "keep_0.1")
    # what is replayed and what the run's default used: the other basis
    replay, run_default = ("layer_scale", "all_parameter") if a.basis == "layers" else ("all_parameter", "layer_scale")
    problems = []
    for spec in a.runs:
        work, run_json = spec.split(":")
        run = json.loads(Path(run_json).read_text())
        for seed_dir in sorted(Path(work).glob("seed-*")):
            seed = int(seed_dir.name.split("-")[1])
            scales = layer_scales(seed_dir / "proxy" / "trajectory.json", a.basis)
            qa = qt.parse_args(["--data-dir", str(data), "--work-dir", work, "--seeds", str(seed)] + a.run_args.split())
            prob = qt.seed_pool(qa, train, len(classnames["classnames"]), seed)
            keys, uids = prob.keys, np.array(prob.keys)
            pool_by_key = {s.key: s for s in prob.pool}
            for pd in sorted(seed_dir.glob("t*")):
                classes = [int(c) for c in pd.name[1:].split("-")]
                d, filt, used = job_scores(propagated_job(pd), keys, scales)
                pipe = ql.pipeline_score(d, filt, uids, a.filter_fraction, a.niche_alpha)[0]
                ev = qt.TargetEval(qa.arch, test, classnames, classes, qa.retrieval_size, seed)
                rec = next(x for x in run["per_problem"] if x["seed"] == seed and x["classes"] == classes)
                row = {"seed": seed, "classes": classes, "scales": scales,
                       f"{run_default}_scales": [s["step_scale"] for s in used]}
                for keep in keeps:
                    f = float(keep.split("_")[1])
                    idx = qt.top_k(pipe, uids, int(math.floor(f * len(keys) + 1e-9)))
                    got = qt.retrain(qa, seed, pool_by_key, sorted(uids[idx]), ev, pd.name)
                    row[keep] = {"zero_shot_target": got["zero_shot_target"],
                                 f"{run_default}_default": rec["selections"][run["default_score"]][keep]
                                 ["zero_shot_target"],
                                 "best_baseline": rec["selections"][run["best_baseline"][keep]][keep]
                                 ["zero_shot_target"]}
                problems.append(row)
                print(f"seed {seed} {pd.name}: " + ", ".join(
                    f"{k} {100 * row[k]['zero_shot_target']:.1f} (run's default "
                    f"{100 * row[k][run_default + '_default']:.1f}, best baseline {100 * row[k]['best_baseline']:.1f})"
                    for k in keeps), flush=True)

    def stat(keep, ref):
        d = [100 * (x[keep]["zero_shot_target"] - x[keep][ref]) for x in problems]
        return {"mean_points": float(np.mean(d)), "sd_points": float(np.std(d, ddof=1)),
                "se_points": float(np.std(d, ddof=1) / np.sqrt(len(d))), "wins": int(sum(v > 0 for v in d)),
                "problems": len(d)}
    out = {"problems": problems,
           f"{replay}_default_minus_{run_default}_default": {k: stat(k, f"{run_default}_default") for k in keeps},
           f"{replay}_default_minus_best_baseline": {k: stat(k, "best_baseline") for k in keeps},
           "command": " ".join(["benchmarks/layer_scale_replay.py"] + (argv if argv is not None else sys.argv[1:]))}
    ql.write_json(Path(a.out), out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("problems", "command")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
