"""Sources of already encoded images, whose bytes go into the shards unchanged: LSUN LMDB exports, CelebA,
and any folder of images."""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Iterator

from nvp_dist.data.sources.base import Record, Source, SplitSource

LSUN_DIR = re.compile(r"^(?P<category>.+)_(?P<split>train|val)_lmdb$")


def _lmdb_split(path: Path, label: int | None) -> SplitSource:
    import lmdb

    def open_env():
        # lock=False: the exports are read-only and may sit on a read-only file system.
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)

    with open_env() as env:
        count = env.stat()["entries"]

    def records() -> Iterator[Record]:
        with open_env() as env, env.begin(buffers=False) as txn:
            for key, value in txn.cursor():
                yield Record(key.decode("ascii", "replace"), bytes(value), label)

    return SplitSource(count, records)


def lsun_source(input_path: str) -> Source:
    """LSUN exports: one LMDB per category and split (`bedroom_train_lmdb`, `bedroom_val_lmdb`...), keys are
    image ids, values encoded JPEG/WebP. INPUT is one such LMDB or a folder of them; with several categories
    the category becomes the class label."""
    root = Path(input_path)
    dirs = [root] if LSUN_DIR.match(root.name) else sorted(p for p in root.iterdir() if LSUN_DIR.match(p.name))
    if not dirs:
        raise FileNotFoundError(f"{input_path}: no CATEGORY_train_lmdb / CATEGORY_val_lmdb directory")
    categories = sorted({LSUN_DIR.match(p.name)["category"] for p in dirs})
    labelled = len(categories) > 1
    by_split: dict[str, list[SplitSource]] = {}
    for p in dirs:
        m = LSUN_DIR.match(p.name)
        label = categories.index(m["category"]) if labelled else None
        by_split.setdefault(m["split"], []).append(_lmdb_split(p, label))

    def merged(parts: list[SplitSource]) -> SplitSource:
        def records() -> Iterator[Record]:
            for part in parts:
                yield from part.records()
        return SplitSource(sum(p.count for p in parts), records)

    dataset = "lsun-" + "-".join(categories)
    return Source(dataset, "lsun", "class" if labelled else "none", categories if labelled else [],
                  {split: merged(parts) for split, parts in by_split.items()})


CELEBA_PARTITIONS = {0: "train", 1: "val", 2: "test"}


def _find(root: Path, name: str) -> Path:
    """The official archive nests files as Anno/, Eval/, Img/; extracted copies are often flat."""
    found = sorted(root.rglob(name))
    if not found:
        raise FileNotFoundError(f"{root}: no {name} under it")
    return found[0]


def celeba_source(input_path: str) -> Source:
    """CelebA: `img_align_celeba/*.jpg`, `list_attr_celeba.txt` (a count line, a line of 40 attribute
    names, then `file v1 ... v40` with values -1/1) and `list_eval_partition.txt` (`file 0|1|2` for
    train/val/test). Attributes are stored as 0/1."""
    root = Path(input_path)
    image_dir = _find(root, "img_align_celeba")
    attr_lines = _find(root, "list_attr_celeba.txt").read_text().splitlines()
    names = attr_lines[1].split()
    attributes = {}
    for line in attr_lines[2:]:
        fields = line.split()
        if fields:
            if len(fields) != len(names) + 1:
                raise ValueError(f"list_attr_celeba.txt: {len(fields) - 1} values for {fields[0]}, "
                                 f"expected {len(names)}")
            attributes[fields[0]] = [int(v == "1") for v in fields[1:]]
    files: dict[str, list[str]] = {name: [] for name in CELEBA_PARTITIONS.values()}
    for line in _find(root, "list_eval_partition.txt").read_text().splitlines():
        if line.strip():
            file, part = line.split()
            files[CELEBA_PARTITIONS[int(part)]].append(file)

    def split(file_names: list[str]) -> SplitSource:
        def records() -> Iterator[Record]:
            for f in file_names:
                yield Record(f, image_dir / f, attributes=attributes[f])
        return SplitSource(len(file_names), records)

    return Source("celeba", "celeba", "attributes", names,
                  {name: split(fs) for name, fs in files.items() if fs})


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Folders are usually sorted by class; the loader reads pieces of consecutive samples, so the file order
# is shuffled (with a fixed seed, so that shards are reproducible) to spread classes over every piece.
FOLDER_ORDER_SEED = 0


def folder_source(input_path: str, holdout: float = 0.0) -> Source:
    """Every image under INPUT, recursively. Top-level train/val/test folders become splits; otherwise all
    images form `train`, with a seeded `holdout` fraction moved to `test`. When every image of the data
    set lies in a subfolder of its split, that first-level subfolder is its class."""
    root = Path(input_path)
    if not root.is_dir():
        raise FileNotFoundError(f"{input_path} is not a directory")
    split_roots = {SPLIT_DIRS[p.name]: p for p in sorted(root.iterdir()) if p.is_dir() and p.name in SPLIT_DIRS}
    if not split_roots:
        split_roots = {"train": root}
    files = {name: sorted(p for p in split_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
             for name, split_root in split_roots.items()}
    rel = {name: [p.relative_to(split_roots[name]) for p in fs] for name, fs in files.items()}
    labelled = all(len(r.parts) > 1 for rs in rel.values() for r in rs)
    classes = sorted({r.parts[0] for rs in rel.values() for r in rs}) if labelled else []
    rng = random.Random(FOLDER_ORDER_SEED)
    records: dict[str, list[Record]] = {}
    for name, paths in files.items():
        recs = [Record(str(r), p, classes.index(r.parts[0]) if labelled else None)
                for p, r in zip(paths, rel[name])]
        rng.shuffle(recs)
        records[name] = recs
    if holdout > 0:
        if set(records) != {"train"}:
            raise ValueError("holdout applies only to folders without train/val/test subfolders")
        n_test = int(round(holdout * len(records["train"])))
        records["test"], records["train"] = records["train"][:n_test], records["train"][n_test:]

    splits = {name: SplitSource(len(recs), lambda recs=recs: iter(recs)) for name, recs in records.items()}
    return Source(root.resolve().name, "folder", "class" if labelled else "none", classes, splits)
