"""The ``pruner`` command line. Each subcommand is a thin wrapper over a library function."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from pruner.config import ConfigError, check_checkpoint_weights, load_config
from pruner.logs import setup_console

DEMO_ROOT = Path("runs/demo")


def _validate(args) -> int:
    try:
        cfg = load_config(args.config, args.set)
        check_checkpoint_weights(cfg)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.config}: valid (fingerprint {cfg.fingerprint()})")
    return 0


def demo_config(root: Path, trajectory: Path) -> dict:
    """The demo job: the embedded CIFAR-10 subset, a proxy trajectory trained on it, local Ray, 2 CPU actors."""
    from pruner.io.shards import DEMO_DIR
    return {
        "name": "demo", "output_dir": str(root / "jobs"), "seed": 0,
        "data": {"shards": [str(DEMO_DIR / "pool")]},
        "target": {"shards": [str(DEMO_DIR / "target")], "max_samples": 200},
        "model": {"arch": "pruner-micro"},
        "trajectory": {"file": str(trajectory)},
        "features": {"k": 256, "bank_size": 256, "batch_size": 50},
        "scores": {"diffin": {"targets": ["target", "train"], "reference_batch_size": 64},
                   "oga": {"iforest_sample": 200}},
        "select": {"keep_fraction": 0.5},  # the default pipeline: CLIP-score filter stage, then diffin_target
        "ray": {"num_actors": 2},
    }


def _demo(args) -> int:
    from pruner.io.shards import DEMO_DIR
    from pruner.jobs.prune import run
    from pruner.train.proxy import main as train_main

    root = Path(args.output)
    traj = root / "proxy" / "trajectory.json"
    if not traj.exists():
        print(f"pruner demo: training the proxy trajectory into {traj.parent}", flush=True)
        status = train_main(["--shards", str(DEMO_DIR / "pool"), "--out", str(traj.parent), "--arch", "pruner-micro",
                             "--steps", str(args.proxy_steps), "--checkpoints", "3", "--batch-size", "32", "--seed", "0"])
        if status:
            return status
    cfg_path = root / "job.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(demo_config(root.resolve(), traj.resolve()), sort_keys=False))
    cfg = load_config(cfg_path, args.set)
    status, summary = run(cfg)
    if status == 0:
        print(json.dumps({k: summary[k] for k in ("counts", "rejects_by_reason", "score")}, indent=2))
    return status


def _prune(args) -> int:
    from pruner.jobs.prune import main as prune_main
    return prune_main(["--config", args.config] + [x for s in args.set for x in ("--set", s)])


def _materialize(args) -> int:
    from pruner.io.manifests import materialize
    counts = materialize(args.manifest, args.out, samples_per_shard=args.samples_per_shard,
                         max_shard_bytes=args.max_shard_bytes, naming=args.naming)
    print(json.dumps(counts, indent=2, default=str))
    return 0


def _train_proxy(argv: list[str]) -> int:
    from pruner.train.proxy import main as train_main
    return train_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_console()
    if argv[:1] == ["train-proxy"]:  # subcommands with their own argument parsers
        return _train_proxy(argv[1:])
    if argv[:1] == ["rescore"]:
        from pruner.rescore import main as rescore_main
        return rescore_main(argv[1:])
    if argv[:1] == ["explain"]:
        from pruner.explain.query import main as explain_main
        return explain_main(argv[1:])
    if argv[:1] == ["cluster"]:
        from pruner.explain.cluster import main as cluster_main
        return cluster_main(argv[1:])
    if argv[:1] == ["report"]:
        from pruner.report.html import main as report_main
        return report_main(argv[1:])
    ap = argparse.ArgumentParser(prog="pruner", description="Influence-based pruning of image-text datasets.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate-config", help="validate a job YAML and exit")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=_validate)
    p = sub.add_parser("demo", help="run the whole job on the embedded demo data (local Ray)")
    p.add_argument("--output", default=str(DEMO_ROOT))
    p.add_argument("--proxy-steps", type=int, default=150)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("prune", help="score, rank and select a pool (local Ray unless ray.address is set)")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=_prune)
    p = sub.add_parser("materialize", help="write the kept samples into new WebDataset tar shards")
    p.add_argument("manifest", help="keep/manifest.json of a finished job")
    p.add_argument("out", help="output folder")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--max-shard-bytes", type=int, default=None)
    p.add_argument("--naming", choices=["pruned", "datacomp"], default="pruned",
                   help="output names: pruned-000000.tar, ... or DataComp's / img2dataset's 00000000.tar, ... (each "
                        "with <name>_stats.json and <name>.parquet, plus sizes.json)")
    p.set_defaults(fn=_materialize)
    sub.add_parser("train-proxy", help="train a proxy CLIP trajectory (see `pruner train-proxy --help`)")
    sub.add_parser("rescore", help="re-score a finished job for a new target or checkpoint (`pruner rescore --help`)")
    sub.add_parser("explain", help="TracIn proponents/opponents of a pair, pool uid or target (`pruner explain --help`)")
    sub.add_parser("cluster", help="spherical k-means of the pool in gradient space (`pruner cluster --help`)")
    sub.add_parser("report", help="self-contained HTML report of a finished job (see `pruner report --help`)")
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
