"""Build the bundled demo shards from the shared CIFAR-10 WebDataset shards (run from the repository root):

    python -m pruner.cli.make_demo [--src ../shared/data] [--out pruner/demo]

Also pool/sizes.json ({shard file: samples}: the shard table of DataComp's resharder and OpenCLIP's loader).

Selection: per class, the samples with the smallest keys (sorted): 100 per class from the train split for the
pool (4 shards x 25 per class = 250 samples each), 20 per class from the test split for the target (1 shard of
200). Within a shard, samples are ordered by sha1(key) as in the source, so every shard mixes all classes.
Member bytes (.jpg, .txt) are copied unchanged; the .json gains a DataComp-style ``uid`` (32 lowercase hex digits:
md5 of the key, :func:`demo_uid`), so the demo's keep/uids.npy holds real uids that DataComp's resharder matches.
Deterministic: tar mtime 0, uid/gid 0, no user names, gzip mtime 0 and no file name, so rebuilding gives
byte-identical files.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

from pruner.io.atomic import write_bytes_atomic
from pruner.io.shards import tar_samples

HERE = Path(__file__).resolve().parent
DEFAULT_SRC = HERE.parents[1] / ".." / "shared" / "data"
POOL_SHARDS, POOL_PER_CLASS_PER_SHARD, TARGET_PER_CLASS = 4, 25, 20
EXTS = ("jpg", "txt", "json")


def load_split(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: member bytes}} for every sample in the split's shards, grouped by pruner.io.shards.tar_samples."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(split_dir.glob("*.tar.gz")):
        with tarfile.open(shard, "r|gz") as tf:
            for key, parts in tar_samples(tf, lambda key, ext: True):
                samples[key].update({ext: data for ext, (_, data) in parts.items()})
    return samples


def first_keys_per_class(samples: dict[str, dict[str, bytes]], n: int) -> dict[str, list[str]]:
    """{class folder: the n smallest keys of that class}, classes in sorted order."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for key in sorted(samples):
        by_class[json.loads(samples[key]["json"])["folder"]].append(key)
    return {c: keys[:n] for c, keys in sorted(by_class.items())}


def demo_uid(key: str) -> str:
    """The demo sample's json uid: 32 lowercase hex digits (a 128-bit value, as DataComp's uids), md5 of the key."""
    return hashlib.md5(key.encode()).hexdigest()


def with_uid(meta: bytes, key: str) -> bytes:
    """The json member with ``uid`` added (keys sorted, compact, UTF-8)."""
    return json.dumps({**json.loads(meta), "uid": demo_uid(key)}, sort_keys=True, ensure_ascii=False).encode()


def shard_bytes(samples: dict[str, dict[str, bytes]], keys: list[str]) -> bytes:
    """A reproducible .tar.gz holding ``keys`` (ordered by sha1 of the key) with their members unchanged."""
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key in sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest()):
            for ext in EXTS:
                data = with_uid(samples[key][ext], key) if ext == "json" else samples[key][ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                tf.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def build(src: Path, out: Path) -> dict[str, int]:
    """Write pool/, target/ and classnames.json under ``out``; return {file name: size in bytes}."""
    src = src / "cifar10"
    train = load_split(src / "train")
    per_class = first_keys_per_class(train, POOL_SHARDS * POOL_PER_CLASS_PER_SHARD)
    files, sizes = {}, {}
    for s in range(POOL_SHARDS):
        keys = [k for ks in per_class.values()
                for k in ks[s * POOL_PER_CLASS_PER_SHARD:(s + 1) * POOL_PER_CLASS_PER_SHARD]]
        files[f"pool/demo-pool-{s:06d}.tar.gz"] = shard_bytes(train, keys)
        sizes[f"demo-pool-{s:06d}.tar.gz"] = len(keys)
    test = load_split(src / "test")
    keys = [k for ks in first_keys_per_class(test, TARGET_PER_CLASS).values() for k in ks]
    files["target/demo-target-000000.tar.gz"] = shard_bytes(test, keys)
    files["classnames.json"] = (src / "classnames.json").read_bytes()
    # the shard table of DataComp's resharder (--shard-table) and OpenCLIP's loader: samples per shard file
    files["pool/sizes.json"] = (json.dumps(sizes, indent=1) + "\n").encode()
    for name, data in files.items():
        write_bytes_atomic(out / name, data)
    return {name: len(data) for name, data in files.items()}


if __name__ == "__main__":  # `python -m pruner.demo.make_demo`, the older spelling of the command
    from pruner.cli.make_demo import main
    raise SystemExit(main())
