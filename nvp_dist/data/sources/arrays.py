"""Sources stored as raw pixel arrays (written as PNG): scikit-learn's digits, CIFAR-10 python batches,
downsampled ImageNet npz files."""
from __future__ import annotations

import io
import pickle
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from nvp_dist.data.sources.base import Source, SplitSource, array_split, chained_split

# The digits split must be the same everywhere (the README and the training issue quote test bits/dim on
# it), so its seed is a constant, not an option.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def digits_source(input_path: str | None = None) -> Source:
    """scikit-learn's 1797 8x8 digits, values 0..16 rescaled to round(v * 255 / 16); a stratified seeded
    80/20 split gives train 1437 / test 360. Needs no input file."""
    if input_path not in (None, "", "-"):
        raise ValueError("the digits source ships with scikit-learn and takes no INPUT (use '-')")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # np.rint rounds half to even like Python's round(): 8 * 255 / 16 = 127.5 becomes 128 either way.
    images = np.rint(digits.images * 255 / 16).astype(np.uint8)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target)
    splits = {
        name: array_split(images[idx], digits.target[idx], [str(i) for i in idx])
        for name, idx in (("train", train_idx), ("test", test_idx))
    }
    return Source("digits", "digits", "class", [str(i) for i in range(10)], splits)


class _BatchUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles, and a pickle can call anything: only numpy arrays (with dicts, lists,
    str and numbers, which need no global) and bytes may be rebuilt. Python 3's protocol 2 writes bytes as
    _codecs.encode(text, "latin1"), which only converts its text."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR batch holds only arrays, "
                                         "lists, dicts, bytes and str")
        return super().find_class(module, name)


def _unpickle(data: bytes, name: str = "") -> dict[bytes, Any]:
    # The batches were pickled by Python 2: keys and file names are byte strings.
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"CIFAR-10 batch {name}: {err}") from err
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR-10 batch {name}: a {type(batch).__name__}, not a dict")
    return batch


def _cifar_files(input_path: Path) -> dict[str, bytes]:
    """Batch name -> pickled bytes, from `cifar-10-python.tar.gz` or a directory holding the batches."""
    wanted = re.compile(r"(data_batch_\d+|test_batch|batches\.meta)$")
    if input_path.is_file():
        with tarfile.open(input_path, "r:*") as tar:
            return {Path(m.name).name: tar.extractfile(m).read()
                    for m in tar.getmembers() if m.isfile() and wanted.search(m.name)}
    return {p.name: p.read_bytes() for p in sorted(input_path.rglob("*")) if wanted.search(p.name)}


def cifar10_source(input_path: str) -> Source:
    """CIFAR-10 python batches: `data_batch_1..5` -> train, `test_batch` -> test; rows are 3072 bytes,
    the red, green and blue 32x32 planes one after the other."""
    files = _cifar_files(Path(input_path))
    train_names = sorted((n for n in files if n.startswith("data_batch_")), key=lambda n: int(n[11:]))
    if not train_names or "test_batch" not in files or "batches.meta" not in files:
        raise FileNotFoundError(f"{input_path}: expected data_batch_N, test_batch and batches.meta "
                                "(cifar-10-python.tar.gz or its extracted folder)")
    label_names = [n.decode() for n in _unpickle(files["batches.meta"], "batches.meta")[b"label_names"]]

    def loader(name: str):
        def load():
            batch = _unpickle(files[name], name)
            images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            ids = [f"{name}/{f.decode()}" for f in batch[b"filenames"]]
            return images, np.asarray(batch[b"labels"]), ids
        return load

    def split(names: list[str]) -> SplitSource:
        count = sum(len(_unpickle(files[n], n)[b"labels"]) for n in names)
        return chained_split([loader(n) for n in names], count)

    return Source("cifar10", "cifar10", "class", label_names,
                  {"train": split(train_names), "test": split(["test_batch"])})


IMAGENET_CLASSES = 1000


def imagenet_source(input_path: str) -> Source:
    """Downsampled ImageNet (Chrabaszcz et al. 2017) npz files: `train_data_batch_N.npz` -> train,
    `val_data.npz` -> val, found anywhere under INPUT (e.g. Imagenet64_train_part1_npz/, Imagenet64_val_npz/).
    Each holds `data` [N, 3*S*S] uint8 in the CIFAR plane layout and `labels` 1..1000."""
    root = Path(input_path)
    train = sorted(root.rglob("train_data_batch_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    val = sorted(root.rglob("val_data.npz"))
    if not train and not val:
        raise FileNotFoundError(f"{input_path}: no train_data_batch_N.npz or val_data.npz under it")

    def loader(path: Path):
        def load():
            with np.load(path) as npz:
                data, labels = npz["data"], np.asarray(npz["labels"]).astype(np.int64)
            side = int(round((data.shape[1] // 3) ** 0.5))
            if 3 * side * side != data.shape[1]:
                raise ValueError(f"{path}: rows of {data.shape[1]} values are not 3 square planes")
            images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
            ids = [f"{path.name}/{i}" for i in range(len(labels))]
            return images, labels - 1, ids  # labels are 1-based in the files
        return load

    def split(paths: list[Path]) -> SplitSource:
        count = 0
        for p in paths:
            with np.load(p) as npz:  # npz members load lazily: this reads the labels only
                count += len(npz["labels"])
        return chained_split([loader(p) for p in paths], count)

    splits = {name: split(paths) for name, paths in (("train", train), ("val", val)) if paths}
    names = [str(i + 1) for i in range(IMAGENET_CLASSES)]
    return Source("imagenet", "imagenet", "class", names, splits)
