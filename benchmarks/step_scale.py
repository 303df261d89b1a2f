"""Checkpoints without optimiser state: how much does Diff-In's estimated step scale change the default's selections
and coresets, against the optimiser's own scale and against the LR alone (a scale of 1)?

    .venv/bin/python benchmarks/quality_target.py --seeds N --work-dir W ...                       # the run
    .venv/bin/python benchmarks/quality_target.py --seeds N --work-dir WB --bare-checkpoints ...    # the same, bare
    .venv/bin/python benchmarks/step_scale.py --runs W:WB:run.json:bare.json ... --out results/step_scale.json

The bare run scores copies of the same proxy checkpoints with the optimiser state dropped (WB links W's pool, pool
record, proxy and retraining cache, so the baselines' coresets are the same and cached), so the job estimates each
checkpoint's step scale (pruner.scores.shared.estimated_step_scale, at scores.diffin.train_batch_size's default).
Per problem this reads both jobs: the scales each used (JobFiles.step_scales), and the default pipeline's selections
(quality_lib.pipeline_score: loss filter, niche test, diffin_target) from each job's diffin_target. A third
selection is formed from the run's stored features with every step scale set to 1 (what a bare checkpoint meant
before the estimate; pruner.scorer.propagation_terms): kept-set overlap with the run's, useful share (correctly
captioned target-class pairs) and swapped share, at keep 30% and 10%. Target zero-shot of the run's and the bare
run's default coresets comes from the two result files (both retrained there); the scale-1 coresets are retrained
here as quality_target.py does (its cache in the run's work dir, the run's default settings: pass the same
``--steps`` etc. as the run did through ``--run-args``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

import quality_lib as ql  # noqa: E402
import quality_target as qt  # noqa: E402
from pruner.config import TARGET_FREE_SCORE  # noqa: E402
from pruner.jobfiles import JobFiles  # noqa: E402

DEFAULT = "filter>diffin_target:propagated"


def propagated_job(problem_dir: Path) -> Path:
    """The problem's prune job with Diff-In's propagated form."""
    from pruner.io.layout import JobLayout
    return next(j for j in sorted((problem_dir / "jobs").iterdir())
                if "form: propagated" in JobLayout(j).config.read_text())


def job_scores(job_dir: Path, keys: list[str], scales: list[float] | None = None
               ) -> tuple[np.ndarray, np.ndarray, list]:
    """(diffin_target, the filter statistic, the step scales the job used) of a job, aligned to ``keys``; with
    ``scales`` (one per checkpoint) diffin_target is formed again from the stored features with those step scales."""
    from pruner.io.store import load_features
    from pruner.scorer import propagation_terms
    from pruner.scores.weights import checkpoint_weights
    job = JobFiles(job_dir)
    t = pq.read_table(job.layout.ranking, columns=["key", "diffin_target", TARGET_FREE_SCORE]).to_pydict()
    pos = {k: i for i, k in enumerate(t["key"])}
    order = np.array([pos[k] for k in keys])
    d, filt = np.asarray(t["diffin_target"], float)[order], np.asarray(t[TARGET_FREE_SCORE], float)[order]
    used = job.step_scales()
    if scales is not None:
        m = len(job.checkpoint_records)
        shared = [dataclasses.replace(job.shared(i), step_scale=x) for i, x in enumerate(scales)]
        terms = propagation_terms(shared, checkpoint_weights(job.config, job.trajectory()), ["target"])
        score = {}
        for url in job.pool():
            rows = pq.read_table(job.layout.scores(url), columns=["key"])["key"].to_pylist()
            s = sum(torch.from_numpy(np.asarray(load_features(job.layout.features(url, i)), np.float64))
                    @ terms[i]["prop_directions"]["target"] for i in range(m))
            score.update(zip(rows, s.tolist()))
        d = np.array([score[k] for k in keys])
    return d, filt, used


def zero_shot(run: dict, seed: int, classes: list[int]) -> dict:
    p = next(x for x in run["per_problem"] if x["seed"] == seed and x["classes"] == classes)
    return {k: v["zero_shot_target"] for k, v in p["selections"][DEFAULT].items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="W:WB:RUN_JSON:BARE_JSON per run (one or more seeds)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--filter-fraction", type=float, default=0.2)
    p.add_argument("--niche-alpha", type=float, default=1e-3)
    p.add_argument("--run-args", default="", help="the runs' own quality_target.py settings (e.g. '--steps 1000')")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_scale.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = Path(a.data_dir)
    train, test, classnames = ql.read_split(data, "train"), ql.read_split(data, "test"), ql.load_classnames(data)
    label_of = {s.key: s.label for s in train}
    problems = []
    for spec in a.runs:
        work, bare_work, run_json, bare_json = spec.split(":")
        run, bare = json.loads(Path(run_json).read_text()), json.loads(Path(bare_json).read_text())
        for bp in bare["per_problem"]:
            seed, classes = bp["seed"], bp["classes"]
            if not (Path(work) / f"seed-{seed}").is_dir():  # a merged result file: this work dir's seeds only
                continue
            name = "t" + "-".join(map(str, classes))
            rec = json.loads((Path(work) / f"seed-{seed}" / "pool.json").read_text())
            keys, swapped = rec["keys"], np.array(rec["swapped"])
            labels = np.array([label_of[k] for k in keys])
            useful = np.isin(labels, classes) & ~swapped
            uids = np.array(keys)
            jobs = {"optimizer": propagated_job(Path(work) / f"seed-{seed}" / name),
                    "estimated": propagated_job(Path(bare_work) / f"seed-{seed}" / name)}
            res = {"seed": seed, "classes": classes, "selections": {}, "scales": {}}
            orders = {}
            for label, job_dir, unit in (("optimizer", jobs["optimizer"], False),
                                         ("estimated", jobs["estimated"], False),
                                         ("lr_only", jobs["optimizer"], True)):
                m = len(JobFiles(job_dir).checkpoint_records)
                d, filt, used = job_scores(job_dir, keys, [1.0] * m if unit else None)
                res["scales"][label] = [1.0] * len(used) if unit else [s["step_scale"] for s in used]
                orders[label] = ql.pipeline_score(d, filt, uids, a.filter_fraction, a.niche_alpha)[0]
            for label, pipe in orders.items():
                for f in (0.3, 0.1):
                    k = int(math.floor(f * len(keys) + 1e-9))
                    idx, ref = qt.top_k(pipe, uids, k), qt.top_k(orders["optimizer"], uids, k)
                    res["selections"].setdefault(label, {})[f"keep_{f}"] = {
                        "overlap_with_optimizer": len(set(idx) & set(ref)) / k,
                        "useful": float(useful[idx].mean()), "swapped": float(swapped[idx].mean())}
            for label, r in (("optimizer", run), ("estimated", bare)):
                for keep, acc in zero_shot(r, seed, classes).items():
                    res["selections"][label][keep]["zero_shot_target"] = acc
            qa = qt.parse_args(["--data-dir", a.data_dir, "--work-dir", work, "--seeds", str(seed)] +
                               a.run_args.split())
            prob = qt.seed_pool(qa, train, len(classnames["classnames"]), seed)
            if prob.keys != keys:
                raise ValueError(f"{work}: --run-args do not rebuild the run's pool (fix: pass its settings)")
            pool_by_key = {s.key: s for s in prob.pool}
            ev = qt.TargetEval(qa.arch, test, classnames, classes, qa.retrieval_size, seed)
            for f in (0.3, 0.1):
                idx = qt.top_k(orders["lr_only"], uids, int(math.floor(f * len(keys) + 1e-9)))
                got = qt.retrain(qa, seed, pool_by_key, sorted(uids[idx]), ev, name)
                res["selections"]["lr_only"][f"keep_{f}"]["zero_shot_target"] = got["zero_shot_target"]
            problems.append(res)
            print(f"seed {seed} {name}: scales {res['scales']}", flush=True)

    def mean(label, keep, key):
        vals = [x["selections"][label][keep].get(key) for x in problems]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    summary = {label: {keep: {key: mean(label, keep, key) for key in
                              ("overlap_with_optimizer", "useful", "swapped", "zero_shot_target")}
                       for keep in ("keep_0.3", "keep_0.1")} for label in ("optimizer", "estimated", "lr_only")}
    paired = {f"{label}_minus_optimizer": {
        keep: [x["selections"][label][keep]["zero_shot_target"] - x["selections"]["optimizer"][keep]["zero_shot_target"]
               for x in problems] for keep in ("keep_0.3", "keep_0.1")} for label in ("estimated", "lr_only")}
    ratios = [e / o for x in problems for e, o in zip(x["scales"]["estimated"], x["scales"]["optimizer"])]
    out = {"problems": problems, "summary": summary,
           "paired_zero_shot": {c: {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)),
                                        "wins": int(sum(x > 0 for x in v)), "per_problem": v}
                                    for k, v in d.items()} for c, d in paired.items()},
           "scale_ratio_estimated_over_optimizer": {"min": min(ratios), "median": float(np.median(ratios)),
                                                    "max": max(ratios)},
           "command": " ".join(["benchmarks/step_scale.py"] + (argv if argv is not None else sys.argv[1:]))}
    ql.write_json(Path(a.out), out)
    print(json.dumps({"summary": summary, "paired": out["paired_zero_shot"],
                      "ratios": out["scale_ratio_estimated_over_optimizer"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
