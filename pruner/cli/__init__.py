"""The ``pruner`` command line: one module per command, each a thin app over the library (its argument parser, the
library call, the one-line outcome and the exit status). argparse lives here and nowhere else in the package, as in
open_clip's split between the library and its scripts.

Exit statuses of every command: 0 done; 1 the job failed or was refused (the message names the cause and the fix);
2 bad input (config, paths, arguments).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pruner.logs import setup_console

#: command -> (its module under pruner.cli, one-line help)
COMMANDS = {
    "prune": ("prune", "score, rank and select a pool (local Ray unless ray.address is set)"),
    "validate-config": ("validate", "validate a job YAML and its checkpoints, and exit"),
    "demo": ("demo", "run the whole job on the embedded demo data (local Ray)"),
    "materialize": ("materialize", "write the kept samples into new WebDataset tar shards"),
    "train-proxy": ("train_proxy", "train a proxy CLIP trajectory"),
    "rescore": ("rescore", "re-score a finished job for a new target or checkpoint, or predict a deletion"),
    "explain": ("explain", "TracIn proponents/opponents of a pair, pool uid or target"),
    "cluster": ("cluster", "spherical k-means of the pool in gradient space"),
    "report": ("report", "self-contained HTML report of a finished job"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_console()
    if argv[:1] and argv[0] in COMMANDS:  # imported on use: `pruner prune` never loads torch before it must
        return importlib.import_module(f"pruner.cli.{COMMANDS[argv[0]][0]}").main(argv[1:])
    ap = argparse.ArgumentParser(prog="pruner", description="Influence-based pruning of image-text datasets.",
                                 epilog="`pruner <command> --help` lists a command's options.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    ap.parse_args(argv)  # no known command: prints the usage (or the help) and exits 2 (0 for --help)
    return 2
