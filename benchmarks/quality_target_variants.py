"""Selection variants on a finished target-aware benchmark run, by selection statistics only (no retraining): do
other ways of spending the budget keep more useful pairs (correctly captioned pairs of a target class) or fewer
swapped ones than the default pipeline?

    .venv/bin/python benchmarks/quality_target.py --seeds 0,1,2 --work-dir /tmp/qt/full ...   # first: the run
    .venv/bin/python benchmarks/quality_target_variants.py --work-dir /tmp/qt/full

Reads each problem's prune job (Diff-In's propagated form, features saved) from ``--work-dir``. Variants, all after
the same filter stage unless named otherwise:

- ``default``: the default pipeline (drop the lowest ``--filter-fraction`` by CLIP score, top-k by diffin_target);
- ``filter_<f>``: the same with a filter stage of f (is the fixed 20% too small or too large?);
- ``diffin_x_clip_<m>``: the CLIP-score top-k among the m*k best by diffin_target (an intersection with influence as
  the relevance filter, as DataComp intersects image similarity with CLIP score);
- ``cover_pairs``: Diff-In's propagated influence on each target pair separately (pruner.scores.propagation with
  that pair's own projected gradient; benchmarks/counterfactual.py's per-pair scores), each pool sample ranked by
  its best rank under any target pair (round-robin over the target pairs): local targets instead of the mean;
- ``cover_classes``: the same over the target classes' mean gradients (uses the target's class labels, which a
  user may not have: an upper reference for coverage).

Result: ``--out`` (JSON): per variant and budget, the mean over problems of the useful and swapped shares and the
per-problem values. RESULTS.md discusses them.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

import quality_lib as ql  # noqa: E402
import quality_target as qt  # noqa: E402


def best_rank_order(scores: np.ndarray) -> np.ndarray:
    """Row order by each row's best (smallest) rank over the columns, descending score per column; ties by the row
    mean. scores: [n, j]."""
    n = scores.shape[0]
    ranks = np.empty_like(scores, dtype=np.int64)
    for j in range(scores.shape[1]):
        ranks[np.argsort(-scores[:, j], kind="stable"), j] = np.arange(n)
    return np.lexsort((-scores.mean(1), ranks.min(1)))


def problem_scores(job_dir: str, keys: list[str], target_labels: dict[str, int]):
    """(diffin_target, CLIP score, per-target-pair propagated influence [n, J], target pair labels [J]) of one
    problem's job, aligned to ``keys``."""
    from counterfactual import per_target_scores, target_features
    from pruner.io.store import load_features
    from pruner.jobfiles import JobFiles
    from pruner.scorer import iter_pool
    job = JobFiles(job_dir)
    cfg, layout, traj = job.config, job.layout, job.trajectory()
    m = len(traj.checkpoints)
    uids, feats = [], [[] for _ in range(m)]
    for url in job.pool():
        uids += pq.read_table(layout.scores(url), columns=["uid"])["uid"].to_pylist()
        for i in range(m):
            feats[i].append(np.asarray(load_features(layout.features(url, i)), np.float32))
    pos = {u: i for i, u in enumerate(uids)}
    order = np.array([pos[k] for k in keys])
    feats = [torch.from_numpy(np.concatenate(f)[order]).double() for f in feats]
    t = pq.read_table(layout.ranking, columns=["uid", "diffin_target", "baseline_clip_score"]).to_pydict()
    rpos = {u: i for i, u in enumerate(t["uid"])}
    rorder = np.array([rpos[k] for k in keys])
    shared = [job.shared(i) for i in range(m)]
    target = list(iter_pool(job.shard_urls(cfg.target.shards)))[: cfg.target.max_samples]
    per_pair = per_target_scores(feats, target_features(cfg, traj, shared, target), shared,
                                 job.checkpoint_records)["diffin_propagated"]
    return (np.asarray(t["diffin_target"], float)[rorder], np.asarray(t["baseline_clip_score"], float)[rorder],
            per_pair, np.array([target_labels[s.key] for s in target]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", required=True, help="a quality_target.py --work-dir with finished jobs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--filter-fraction", type=float, default=0.2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_target_variants.json"))
    a = p.parse_args(argv)
    qa = qt.parse_args(["--work-dir", a.work_dir, "--seeds", a.seeds])  # the run's problem settings (defaults)
    torch.set_num_threads(1)
    data = Path(qa.data_dir)
    train = ql.read_split(data, "train")
    n_cls = len(ql.load_classnames(data)["classnames"])
    rows: dict[str, dict[str, list]] = {}
    for seed in qa.seed_list:
        prob = ql.build_problem(train, qa.pool_size, 0, qa.noise, seed, n_cls, qa.rare_classes, qa.rare_weight)
        keys = np.array(prob.keys)
        for classes in qt.pick_targets(qa, seed, prob.rare_classes, n_cls):
            name = "t" + "-".join(map(str, classes))
            jobs = sorted((Path(a.work_dir) / f"seed-{seed}" / name / "jobs").iterdir())
            job_dir = next(str(j) for j in jobs if (j / "config.yaml").read_text().count("form: propagated"))
            labels = {s.key: s.label for s in qt.target_samples(train, set(prob.keys), classes, qa.per_class, seed)}
            d, clip, per_pair, tl = problem_scores(job_dir, prob.keys, labels)
            n = len(keys)
            passed = qt.top_k(clip, keys, n - int(math.floor(a.filter_fraction * n)))
            per_class = np.stack([per_pair[:, tl == c].mean(1) for c in classes], 1)
            pair_order = passed[best_rank_order(per_pair[passed])]
            class_order = passed[best_rank_order(per_class[passed])]

            def inter(k, mult):
                cand = passed[qt.top_k(d[passed], keys[passed], min(len(passed), int(mult * k)))]
                return cand[qt.top_k(clip[cand], keys[cand], k)]

            sels = {"default": lambda k: qt.filtered(d, clip, keys, k, a.filter_fraction),
                    **{f"filter_{f}": (lambda f: lambda k: qt.filtered(d, clip, keys, k, f))(f)
                       for f in (0.0, 0.1, 0.3, 0.4)},
                    "diffin_x_clip_1.5": lambda k: inter(k, 1.5), "diffin_x_clip_2": lambda k: inter(k, 2.0),
                    "cover_pairs": lambda k: pair_order[:k], "cover_classes": lambda k: class_order[:k]}
            useful = np.isin(prob.labels, classes) & ~prob.swapped
            for sname, fn in sels.items():
                for f in (0.3, 0.1):
                    idx = fn(int(math.floor(f * n + 1e-9)))
                    r = rows.setdefault(sname, {}).setdefault(f"keep_{f}", [])
                    r.append({"problem": f"seed {seed} {name}", "useful": float(useful[idx].mean()),
                              "swapped": float(prob.swapped[idx].mean()),
                              "useful_per_class": [int((useful[idx] & (prob.labels[idx] == c)).sum())
                                                   for c in classes]})
            print(f"seed {seed} {name}: done", flush=True)
    out = {"variants": {s: {b: {"useful": float(np.mean([x["useful"] for x in v])),
                                "swapped": float(np.mean([x["swapped"] for x in v])), "problems": v}
                            for b, v in per.items()} for s, per in rows.items()},
           "work_dir": a.work_dir, "filter_fraction": a.filter_fraction,
           "command": " ".join([".venv/bin/python", "benchmarks/quality_target_variants.py"] + (argv or sys.argv[1:]))}
    ql.write_json(Path(a.out), out)
    print("| variant | useful kept 30% | swapped 30% | useful kept 10% | swapped 10% |\n|---|---|---|---|---|")
    for s, per in out["variants"].items():
        print(f"| {s} | {100 * per['keep_0.3']['useful']:.1f} | {100 * per['keep_0.3']['swapped']:.1f} | "
              f"{100 * per['keep_0.1']['useful']:.1f} | {100 * per['keep_0.1']['swapped']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
