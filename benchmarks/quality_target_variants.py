"""Selection variants on a finished target-aware benchmark run, by selection statistics only (no retraining): do
other ways of spending the budget keep more useful pairs (correctly captioned pairs of a target class) or fewer
swapped ones than the default pipeline?

    .venv/bin/python benchmarks/quality_target.py --seeds 0,1,2 --work-dir /tmp/qt/full ...   # first: the run
    .venv/bin/python benchmarks/quality_target_variants.py --work-dir /tmp/qt/full

Reads each problem's prune job (Diff-In's propagated form, features saved) from ``--work-dir``. Variants, all after
the same filter stage unless named otherwise. "The filter statistic" is the product's, pruner.config.TARGET_FREE_SCORE
(the proxy's loss; the CLIP score in runs before commit 2109c3c, when the names below were given):

- ``default``: the default pipeline (quality_lib.pipeline_score: the filter stage sets apart the lowest
  ``--filter-fraction`` by the filter statistic; the niche test of diffin_target over the passing samples: with a
  niche they are ranked by diffin_target, without one every sample by the filter statistic);
- ``filter_then_diffin``: the pipeline before the niche test (the filter stage, then top-k by diffin_target), and
  ``filter_<f>``: that with a filter stage of f (is the fixed 20% too small or too large?);
- ``diffin_x_clip_<m>``: the filter statistic's top-k among the m*k best by diffin_target (an intersection with
  influence as the relevance filter, as DataComp intersects image similarity with CLIP score);
- ``cover_pairs``: Diff-In's propagated influence on each target pair separately (pruner.scores.propagation with
  that pair's own projected gradient; benchmarks/counterfactual.py's per-pair scores), each pool sample ranked by
  its best rank under any target pair (round-robin over the target pairs): local targets instead of the mean;
- ``cover_classes``: the same over the target classes' mean gradients (uses the target's class labels, which a
  user may not have: an upper reference for coverage);
- ``head_<h>_then_clip``: the best h x budget by ``filter_then_diffin``, then the rest by the filter statistic (a
  head sized by the budget instead of by the niche);
- references that know the ground truth (what no selection can beat by much): ``oracle_clean``, the default's
  order with every swapped pair skipped; ``oracle_useful_then_clip``, every useful pair, then the filter
  statistic's top of the correctly captioned rest.

``--retrain`` also trains the coresets of ``default``, ``filter_then_diffin``, ``head_*`` and the references from
scratch as the run did (its cache in the run's work dir, so coresets already trained are not trained again) and
records target zero-shot, with the paired difference to the run's best baseline (``--run-json``, the run's result
file). Every problem records the niche test of diffin_target over the pool for each form (``niche_tests``).

Result: ``--out`` (JSON): per variant and budget, the mean over problems of the useful and swapped shares (and
target zero-shot with ``--retrain``) and the per-problem values. RESULTS.md discusses them.
"""
from __future__ import annotations

import argparse
import json
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
from pruner.config import TARGET_FREE_SCORE  # noqa: E402


def best_rank_order(scores: np.ndarray) -> np.ndarray:
    """Row order by each row's best (smallest) rank over the columns, descending score per column; ties by the row
    mean. scores: [n, j]."""
    n = scores.shape[0]
    ranks = np.empty_like(scores, dtype=np.int64)
    for j in range(scores.shape[1]):
        ranks[np.argsort(-scores[:, j], kind="stable"), j] = np.arange(n)
    return np.lexsort((-scores.mean(1), ranks.min(1)))


def other_scores(job_dir: str, keys: list[str]) -> dict[str, np.ndarray]:
    """The first-order target scores of a problem, aligned to ``keys``: tracin_target of the propagated form's job and
    diffin_target of the exact_increment form's job (the run's other job of the problem, when it has one)."""
    from pruner.io.layout import JobLayout
    out = {}
    for jd in sorted(Path(job_dir).parent.iterdir()):
        layout = JobLayout(jd)
        text = layout.config.read_text()
        col, name = (("tracin_target", "tracin_target") if "form: propagated" in text else
                     ("diffin_target", "diffin_target:exact_increment") if "form: exact_increment" in text else
                     (None, None))
        if col is None:
            continue
        t = pq.read_table(layout.ranking, columns=["uid", col]).to_pydict()
        pos = {u: i for i, u in enumerate(t["uid"])}
        out[name] = np.asarray(t[col], float)[[pos[k] for k in keys]]
    return out


def problem_scores(job_dir: str, keys: list[str], target_labels: dict[str, int]):
    """(diffin_target, the filter statistic (pruner.config.TARGET_FREE_SCORE), per-target-pair propagated influence
    [n, J], target pair labels [J]) of one problem's job, aligned to ``keys``."""
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
    t = pq.read_table(layout.ranking, columns=["uid", "diffin_target", TARGET_FREE_SCORE]).to_pydict()
    rpos = {u: i for i, u in enumerate(t["uid"])}
    rorder = np.array([rpos[k] for k in keys])
    shared = [job.shared(i) for i in range(m)]
    target = list(iter_pool(job.shard_urls(cfg.target.shards)))[: cfg.target.max_samples]
    per_pair = per_target_scores(feats, target_features(cfg, traj, shared, target), shared,
                                 job.checkpoint_records)["diffin_propagated"]
    return (np.asarray(t["diffin_target"], float)[rorder], np.asarray(t[TARGET_FREE_SCORE], float)[rorder],
            per_pair, np.array([target_labels[s.key] for s in target]))


def main(argv=None) -> int:
    from pruner.io.layout import JobLayout
    from pruner.select.niche import niche_test_values
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", required=True, help="a quality_target.py --work-dir with finished jobs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300, help="the run's --steps (proxy and retrainings)")
    p.add_argument("--pool-size", type=int, default=5000, help="the run's --pool-size")
    p.add_argument("--per-class", type=int, default=10, help="the run's --per-class")
    p.add_argument("--variants", default="", help="only these variants (comma list; default all)")
    p.add_argument("--filter-fraction", type=float, default=0.2)
    p.add_argument("--niche-alpha", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retrain", action="store_true", help="train every variant's coreset and record zero-shot")
    p.add_argument("--run-json", default=str(ROOT / "benchmarks" / "results" / "quality_target.json"),
                   help="the run's result file (its best baseline per problem, for --retrain's paired differences)")
    p.add_argument("--into-run", help="with --retrain: write the run's result file again to this path with the default "
                   "pipeline's retrained rows as its default (the run's own default becomes "
                   "'filter>diffin_target (no niche test)') and its summary recomputed")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_target_variants.json"))
    a = p.parse_args(argv)
    if a.into_run and not a.retrain:
        p.error("--into-run needs --retrain")
    qa = qt.parse_args(["--work-dir", a.work_dir, "--seeds", a.seeds, "--steps", str(a.steps),
                        "--pool-size", str(a.pool_size), "--per-class", str(a.per_class)])  # the run's settings
    torch.set_num_threads(a.threads)
    data = Path(qa.data_dir)
    train = ql.read_split(data, "train")
    n_cls = len(ql.load_classnames(data)["classnames"])
    test_split, classnames = (ql.read_split(data, "test"), ql.load_classnames(data)) if a.retrain else (None, None)
    run = json.loads(Path(a.run_json).read_text()) if a.retrain else None
    rows: dict[str, dict[str, list]] = {}
    niche_tests, merged = {}, {}
    for seed in qa.seed_list:
        prob = qt.seed_pool(qa, train, n_cls, seed)
        keys = np.array(prob.keys)
        pool_by_key = {s.key: s for s in prob.pool}
        for classes in qt.pick_targets(qa, seed, prob.rare_classes, n_cls):
            name = "t" + "-".join(map(str, classes))
            jobs = sorted((Path(a.work_dir) / f"seed-{seed}" / name / "jobs").iterdir())
            job_dir = next(str(j) for j in jobs if JobLayout(j).config.read_text().count("form: propagated"))
            labels = {s.key: s.label for s in qt.target_samples(train, set(prob.keys), classes, qa.per_class, seed)}
            d, filt, per_pair, tl = problem_scores(job_dir, prob.keys, labels)
            n = len(keys)
            niche = niche_test_values(d, "diffin_target", a.niche_alpha)
            niche_tests[f"seed {seed} {name}"] = {
                "diffin_target": niche.record(),
                **{c: niche_test_values(v, c, a.niche_alpha).record()
                   for c, v in other_scores(job_dir, prob.keys).items()}}
            passed = qt.top_k(filt, keys, n - int(math.floor(a.filter_fraction * n)))
            per_class = np.stack([per_pair[:, tl == c].mean(1) for c in classes], 1)
            pair_order = passed[best_rank_order(per_pair[passed])]
            class_order = passed[best_rank_order(per_class[passed])]
            default_order = passed[qt.top_k(d[passed], keys[passed], len(passed))]
            useful = np.isin(prob.labels, classes) & ~prob.swapped

            def inter(k, mult):
                cand = passed[qt.top_k(d[passed], keys[passed], min(len(passed), int(mult * k)))]
                return cand[qt.top_k(filt[cand], keys[cand], k)]

            def then_clip(head, k):
                """``head`` (at most k, in order), then the filter statistic's top of every other sample."""
                head = head[:k]
                rest = np.setdiff1d(np.arange(n), head)
                return np.concatenate([head, rest[qt.top_k(filt[rest], keys[rest], k - len(head))]])

            def oracle_useful(k):
                """Every useful pair (the filter statistic's top of them if more than k), then the filter
                statistic's top of the correctly captioned rest."""
                u, c = np.nonzero(useful)[0], np.nonzero(~useful & ~prob.swapped)[0]
                u = u[qt.top_k(filt[u], keys[u], min(k, len(u)))]
                return np.concatenate([u, c[qt.top_k(filt[c], keys[c], k - len(u))]])

            pipe, niche_tests[f"seed {seed} {name}"]["default_pipeline"] = ql.pipeline_score(
                d, filt, keys, a.filter_fraction, a.niche_alpha)
            sels = {"default": lambda k: qt.top_k(pipe, keys, k),
                    "filter_then_diffin": lambda k: qt.filtered(d, filt, keys, k, a.filter_fraction),
                    **{f"filter_{f}": (lambda f: lambda k: qt.filtered(d, filt, keys, k, f))(f)
                       for f in (0.0, 0.1, 0.3, 0.4)},
                    "diffin_x_clip_1.5": lambda k: inter(k, 1.5), "diffin_x_clip_2": lambda k: inter(k, 2.0),
                    "cover_pairs": lambda k: pair_order[:k], "cover_classes": lambda k: class_order[:k],
                    "head_0.7_then_clip": lambda k: then_clip(default_order[:int(0.7 * k)], k),
                    "oracle_clean": lambda k: default_order[~prob.swapped[default_order]][:k],
                    "oracle_useful_then_clip": oracle_useful}
            ev = qt.TargetEval(qa.arch, test_split, classnames, classes, qa.retrieval_size, seed) if a.retrain else None
            for sname, fn in sels.items():
                if a.variants and sname not in a.variants.split(","):
                    continue
                for f in (0.3, 0.1):
                    k = int(math.floor(f * n + 1e-9))
                    idx = fn(k)
                    assert len(np.unique(idx)) == len(idx) == k, (sname, f)
                    r = rows.setdefault(sname, {}).setdefault(f"keep_{f}", [])
                    row = {"problem": f"seed {seed} {name}", "useful": float(useful[idx].mean()),
                           "swapped": float(prob.swapped[idx].mean()),
                           "useful_per_class": [int((useful[idx] & (prob.labels[idx] == c)).sum()) for c in classes]}
                    if a.retrain and not sname.startswith(("filter_0", "diffin_x", "cover")):
                        res = qt.retrain(qa, seed, pool_by_key, sorted(keys[i] for i in idx), ev, name)
                        row["target_zero_shot"] = res["zero_shot_target"]
                        if sname == "default":  # the run's row for --into-run, as quality_target.run_seed writes it
                            merged.setdefault((seed, tuple(classes)), {})[f"keep_{f}"] = {
                                "target_share": float(useful[idx].mean()),
                                "swapped_share": float(prob.swapped[idx].mean()),
                                "target_class_share": float(np.isin(prob.labels[idx], classes).mean()), **res}
                        pp = next(x for x in run["per_problem"] if x["seed"] == seed and x["classes"] == classes)
                        best = run["best_baseline"][f"keep_{f}"]
                        row["minus_best_baseline"] = res["zero_shot_target"] - \
                            pp["selections"][best][f"keep_{f}"]["zero_shot_target"]
                    r.append(row)
            print(f"seed {seed} {name}: done (niche test: {niche.record()})", flush=True)

    def summary(v):
        out = {"useful": float(np.mean([x["useful"] for x in v])), "swapped": float(np.mean([x["swapped"] for x in v])),
               "problems": v}
        if all("target_zero_shot" in x for x in v):
            diff = [x["minus_best_baseline"] for x in v]
            out.update(target_zero_shot=float(np.mean([x["target_zero_shot"] for x in v])),
                       minus_best_baseline=float(np.mean(diff)), minus_best_baseline_sd=float(np.std(diff, ddof=1)),
                       wins=int(sum(x > 0 for x in diff)))
        return out

    out = {"variants": {s: {b: summary(v) for b, v in per.items()} for s, per in rows.items()},
           "niche_tests": niche_tests, "work_dir": a.work_dir, "filter_fraction": a.filter_fraction,
           "best_baseline": run["best_baseline"] if run else None,
           "command": " ".join([".venv/bin/python", "benchmarks/quality_target_variants.py"] + (argv or sys.argv[1:]))}
    ql.write_json(Path(a.out), out)
    if a.into_run:
        problems = run["per_problem"]
        for pp in problems:
            sel = pp["selections"]
            sel["filter>diffin_target (no niche test)"] = sel.pop(qt.DEFAULT_PIPELINE)
            sel[qt.DEFAULT_PIPELINE] = merged[(pp["seed"], tuple(pp["classes"]))]
            pp["niche_test"] = niche_tests[f"seed {pp['seed']} t{'-'.join(map(str, pp['classes']))}"]["default_pipeline"]
        command = (run["command"] + " ; then, once the niche test existed, on its stored jobs and cache: "
                   + out["command"])
        ql.write_json(Path(a.into_run), qt.summarize(problems, run["config"], command, run["wall_time_s"]))
    print("| variant | useful kept 30% | swapped 30% | useful kept 10% | swapped 10% | ZS 30% (vs best baseline) | "
          "ZS 10% (vs best baseline) |\n|---|---|---|---|---|---|---|")
    for s, per in out["variants"].items():
        zs = [f"{100 * per[b]['target_zero_shot']:.1f} ({100 * per[b]['minus_best_baseline']:+.1f} ± "
              f"{100 * per[b]['minus_best_baseline_sd']:.1f}, {per[b]['wins']}/{len(per[b]['problems'])})"
              if "target_zero_shot" in per[b] else "" for b in ("keep_0.3", "keep_0.1")]
        print(f"| {s} | {100 * per['keep_0.3']['useful']:.1f} | {100 * per['keep_0.3']['swapped']:.1f} | "
              f"{100 * per['keep_0.1']['useful']:.1f} | {100 * per['keep_0.1']['swapped']:.1f} | {zs[0]} | {zs[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
