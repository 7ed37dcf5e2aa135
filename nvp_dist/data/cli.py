"""`nvp-dist shards FORMAT INPUT OUT_DIR` writes WebDataset shards; `nvp-dist shards --verify OUT_DIR`
re-hashes them against the manifest."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from nvp_dist.data.manifest import DataError, verify_shards
from nvp_dist.data.sources import SOURCE_FORMATS, open_source
from nvp_dist.data.writer import DEFAULT_INDEX_EVERY, write_shards

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(text: str) -> int:
    """'500MB', '64k', '1GiB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 64k, 1GiB)")
    return int(float(m[1]) * _UNITS[m[2] or ""])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("source_format", nargs="?", choices=sorted(SOURCE_FORMATS),
                        help="the source's format")
    parser.add_argument("input", nargs="?",
                        help="the source file or folder ('-' or omitted for digits: scikit-learn ships it)")
    parser.add_argument("out_dir", nargs="?", help="folder for the shards and manifest.json")
    parser.add_argument("--verify", metavar="OUT_DIR",
                        help="re-hash the shards of OUT_DIR against its manifest and report every mismatch")
    parser.add_argument("--max-shard-size", type=parse_size, default="500MB",
                        help="upper bound of one shard's size (default 500MB)")
    parser.add_argument("--index-every", type=int, default=DEFAULT_INDEX_EVERY,
                        help="record the byte offset of every Nth sample: the loader's piece size "
                             f"(default {DEFAULT_INDEX_EVERY})")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="folder only: seeded fraction of the images moved to a 'test' split")
    parser.add_argument("--name", help="data set name stored in the manifest (default: from the source)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _verify(path: str) -> int:
    problems = verify_shards(path)
    for line in problems:
        print(f"MISMATCH {line}")
    if problems:
        print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{path}: every shard matches the manifest")
    return 0


def _convert(args: argparse.Namespace) -> int:
    input_path, out_dir = args.input, args.out_dir
    if args.source_format == "digits" and out_dir is None:
        input_path, out_dir = None, input_path  # `nvp-dist shards digits OUT_DIR`
    if args.source_format is None or out_dir is None:
        print("usage: nvp-dist shards FORMAT INPUT OUT_DIR, or nvp-dist shards --verify OUT_DIR",
              file=sys.stderr)
        return 2
    options = {"holdout": args.holdout} if args.source_format == "folder" else {}
    source = open_source(args.source_format, input_path, **options)
    if args.name:
        source = dataclasses.replace(source, dataset=args.name)
    manifest = write_shards(source, out_dir, max_shard_bytes=args.max_shard_size,
                            index_every=args.index_every, progress=not args.no_progress)
    for name, split in sorted(manifest.splits.items()):
        print(f"{name}: {split.num_samples} images {split.image_shape} in {len(split.shards)} shard(s)")
    print(f"wrote {out_dir}/manifest.json ({manifest.dataset}, labels: {manifest.cond_kind})")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _verify(args.verify) if args.verify else _convert(args)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"nvp-dist shards: {err}", file=sys.stderr)
        return 1
