"""``pruner rescore <job> --target SHARDS | --add-checkpoint CKPT | --delete UIDS [--write-update CKPT]``:
re-target a finished job from its stored features, extend its trajectory by a later checkpoint, or predict what
removing a set of samples does to the target loss (data deletion) and write Diff-In's parameter update."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pruner.cli import COMMANDS
from pruner.deletion import predict, read_uids, write_update
from pruner.io.layout import JobLayout
from pruner.jobfiles import JobFiles
from pruner.rescore import PRECISIONS, add_checkpoint, retarget


def _delete(args) -> int:
    """``--delete``: print the predicted change of the losses (and, with ``--write-update``, write the update)."""
    layout = JobLayout(Path(args.job))
    uids = read_uids(layout, args.delete)
    pred = predict(layout, uids)
    missing = f" ({pred['missing']} of the given uids are not in the job)" if pred["missing"] else ""
    print(f"pruner rescore: deleting {pred['n']} samples{missing}, predicted change of the loss (removal convention, "
          f"loss units): " + ", ".join(f"{c} {v:+.6g}" for c, v in pred["predicted_change"].items()), flush=True)
    if args.write_update:
        diag = write_update(args.job, uids, args.write_update, args.lanczos_steps)
        change = diag["first_order_target_change"]
        print(f"pruner rescore: wrote {args.write_update} (theta_T + the set's parameter influence, {diag['form']} "
              f"form; |delta| {diag['norm_delta']:.4g}" + ("" if change is None else
                                                         f"; <v_target, delta> {change:+.6g}") + ")", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pruner rescore", description=COMMANDS["rescore"][1])
    ap.add_argument("job", help="a finished job directory")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", nargs="+", help="re-target: new target WebDataset shards (dirs, globs, URLs); a job "
                      "scored without a target set then ranks by help to this one (docs/operations.md)")
    what.add_argument("--add-checkpoint", help="extend the trajectory by this (later) checkpoint file")
    what.add_argument("--delete", metavar="UIDS", help="data deletion: the predicted change of the target loss from "
                      "removing these samples from training (a Parquet file with a uid column, or 'dropped': the "
                      "samples the job's selection drops)")
    ap.add_argument("--write-update", metavar="CKPT", help="with --delete: write Diff-In's parameter update, theta_T + "
                    "the set's parameter influence, as an OpenCLIP checkpoint")
    ap.add_argument("--lanczos-steps", type=int, default=30, help="with --write-update (propagated form): Krylov "
                    "vectors per matrix function")
    ap.add_argument("--step", type=int, help="global step of the added checkpoint (default: from the file)")
    ap.add_argument("--lr", type=float, help="learning rate at the added checkpoint (default: from the file)")
    ap.add_argument("--lr-mean", type=float, help="mean learning rate since the previous checkpoint")
    ap.add_argument("--device", default="auto", help="re-target only (where the new target's gradients are "
                    "computed); --add-checkpoint scores on the job's Ray actors (ray.accelerator)")
    ap.add_argument("--precision", default="int8", choices=PRECISIONS, help="re-target only: on a CPU, read an int8 "
                    "copy of the stored features (built on first use under <job>/int8/, about twice as fast "
                    "afterwards; default) or the fp16 features themselves")
    args = ap.parse_args(argv)
    if args.write_update and not args.delete:
        ap.error("--write-update needs --delete")
    try:
        if args.delete:
            return _delete(args)
        if args.target:
            out = retarget(args.job, args.target, args.device, args.precision)
        else:
            out = add_checkpoint(args.job, args.add_checkpoint, args.step, args.lr, args.lr_mean)
    except (OSError, ValueError, RuntimeError) as e:  # refusals and failures name their cause (PlacementError too)
        print(f"pruner rescore: {e}", file=sys.stderr)
        return 1
    summary = JobFiles(out).summary()
    print(f"pruner rescore: {out} (kept {summary['counts']['kept']} of {summary['counts']['samples']}, ranked by "
          f"{summary.get('score')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
