"""``python -m pruner.cli.make_demo [--src ../shared/data] [--out pruner/demo]`` (from the repository root):
rebuild the bundled demo shards from the shared CIFAR-10 WebDataset shards (:func:`pruner.demo.make_demo.build`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pruner.demo.make_demo import DEFAULT_SRC, HERE, build


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pruner.cli.make_demo", description="Rebuild the bundled demo shards from the shared CIFAR-10 shards.")
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="shared data folder holding cifar10/")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    sizes = build(args.src, args.out)
    for name, size in sizes.items():
        print(f"{size:>9,d}  {name}")
    print(f"{sum(sizes.values()):>9,d}  total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
