"""Small files in the real source formats, tiny shard sets, and in-place tampering of shards, for the data
tests (tests/test_data_*.py)."""
from __future__ import annotations

import hashlib
import io
import pickle
import socket
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from nvp_dist.data.sources import Source
from nvp_dist.data.sources.base import array_split
from nvp_dist.data.writer import write_shards

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()


def rng_images(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    shape = (n, h, w, c) if c > 1 else (n, h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def read_shards(out_dir: Path, split: str) -> dict[str, dict[str, bytes]]:
    """Every sample of a split's shards, read with tarfile alone: "shard/key" (as in Batch.keys, sorted
    by split index) -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out_dir.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                samples.setdefault(f"{path.name}/{key}", {})[ext] = tar.extractfile(m).read()
    return samples


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def write_cifar(root: Path, per_batch: int = 3, n_test: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """`cifar-10-batches-py/` as in cifar-10-python.tar.gz: Python-2 style pickles with byte-string keys,
    rows of 3072 bytes (R, G, B planes). Returns split -> (HWC images, labels) in file order."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        images = rng_images(n, 32, 32, seed=b)
        labels = [(b + i) % 10 for i in range(n)]
        batch = {b"batch_label": name.encode(), b"labels": labels,
                 b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
                 b"filenames": [f"img_{b}_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        split = "test" if name == "test_batch" else "train"
        expected[split][0].extend(images)
        expected[split][1].extend(labels)
    meta = {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": per_batch,
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {k: (np.stack(v[0]), v[1]) for k, v in expected.items()}


def write_imagenet(root: Path, side: int = 8) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Downsampled-ImageNet npz files (`data` [N, 3*side*side] in plane layout, `labels` 1..1000, `mean`)
    in the Imagenet{side}_train_npz / Imagenet{side}_val_npz layout."""
    parts = {"train": [f"Imagenet{side}_train_npz/train_data_batch_{i}.npz" for i in (1, 2, 10)],
             "val": [f"Imagenet{side}_val_npz/val_data.npz"]}
    expected = {}
    for split, files in parts.items():
        all_images, all_labels = [], []
        for f, rel in enumerate(files):
            images = rng_images(3 + f, side, side, seed=17 + f + len(split))
            # 1-based labels, including both ends of 1..1000
            labels = np.array([1000, 1] + [2 + (7 * i + f) % 998 for i in range(2, len(images))])
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, data=images.transpose(0, 3, 1, 2).reshape(len(images), -1), labels=labels,
                     mean=np.zeros(3 * side * side))
            all_images.append(images)
            all_labels.append(labels)
        expected[split] = (np.concatenate(all_images), np.concatenate(all_labels) - 1)
    return expected


def write_lsun(root: Path, categories=("bedroom", "tower")) -> dict[str, list[tuple[str, bytes, int]]]:
    """LSUN-style LMDBs `{category}_{split}_lmdb`, keys sha1-like ids, values JPEG (one WebP) images of
    varying sizes. Returns split -> [(key, bytes, category index)]."""
    import lmdb

    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, list[tuple[str, bytes, int]]] = {"train": [], "val": []}
    for ci, category in enumerate(categories):
        for split, n in (("train", 4), ("val", 2)):
            env = lmdb.open(str(root / f"{category}_{split}_lmdb"), map_size=1 << 24)
            with env.begin(write=True) as txn:
                for i in range(n):
                    image = rng_images(1, 70 + 10 * i, 100, seed=100 * ci + i + n)[0]
                    data = encode(image, "WEBP", lossless=True) if i == 1 else encode(image, "JPEG", quality=90)
                    key = hashlib.sha1(f"{category}{split}{i}".encode()).hexdigest()
                    txn.put(key.encode(), data)
                    expected[split].append((key, data, ci))
            env.close()
    return expected


def write_celeba(root: Path, n: int = 6) -> dict[str, list[tuple[str, bytes, list[int]]]]:
    """CelebA's files: img_align_celeba/NNNNNN.jpg (218x178), list_attr_celeba.txt (count, names, rows of
    -1/1 values, two spaces before a 1 as in the original), list_eval_partition.txt (file 0|1|2)."""
    (root / "img_align_celeba").mkdir(parents=True)
    attr_lines = [str(n), " ".join(CELEBA_ATTRIBUTES) + " "]
    partition_lines = []
    expected: dict[str, list] = {"train": [], "val": [], "test": []}
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        data = encode(rng_images(1, 218, 178, seed=i)[0], "JPEG", quality=85)
        (root / "img_align_celeba" / name).write_bytes(data)
        values = [1 if (i + a) % 3 == 0 else -1 for a in range(len(CELEBA_ATTRIBUTES))]
        attr_lines.append(name + "".join(f" {v:2d}" for v in values))
        part = (0, 0, 0, 1, 2, 1)[i % 6]
        partition_lines.append(f"{name} {part}")
        expected[("train", "val", "test")[part]].append((name, data, [int(v == 1) for v in values]))
    (root / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")
    return expected


def write_folder(root: Path) -> dict[str, tuple[str, bytes | np.ndarray]]:
    """cat/ and dog/ class folders (one nested deeper) with PNG, JPEG, WebP and a BMP (to be re-encoded as
    PNG), plus a file that is not an image. Returns relative path -> (class, original bytes or pixels)."""
    files = {
        "cat/a.png": ("cat", encode(rng_images(1, 12, 10, seed=1)[0], "PNG")),
        "cat/b.jpg": ("cat", encode(rng_images(1, 9, 9, seed=2)[0], "JPEG")),
        "dog/c.webp": ("dog", encode(rng_images(1, 16, 8, seed=3)[0], "WEBP", lossless=True)),
        "dog/deep/d.jpeg": ("dog", encode(rng_images(1, 10, 10, seed=4)[0], "JPEG")),
    }
    for rel, (_, data) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    bmp = rng_images(1, 6, 7, seed=5)[0]
    (root / "dog/e.bmp").write_bytes(encode(bmp, "BMP"))
    (root / "cat/broken.jpg").write_bytes(b"not a jpeg at all")
    return {**files, "dog/e.bmp": ("dog", bmp)}


def tiny_source(n_train: int = 150, n_test: int = 37, side: int = 8, classes: int = 5) -> Source:
    """Random RGB images with labels: a fast stand-in for a real data set in loader tests."""
    def split(n: int, seed: int):
        labels = np.arange(n) % classes
        return array_split(rng_images(n, side, side, seed=seed), labels, [f"{seed}-{i}" for i in range(n)])
    return Source("tiny", "digits", "class", [f"c{i}" for i in range(classes)],
                  {"train": split(n_train, 1), "test": split(n_test, 2)})


def write_tiny(out_dir: Path, max_shard_bytes: int = 40_960, index_every: int = 8, **kw) -> Path:
    """Uneven shards (several per split, the last ones short) with small pieces."""
    write_shards(tiny_source(**kw), out_dir, max_shard_bytes=max_shard_bytes, index_every=index_every,
                 progress=False)
    return out_dir


def _member(path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)


def corrupt_member(path: Path, name: str) -> None:
    """Zero a member's bytes in place: the tar stays valid (same length), the image does not."""
    member = _member(path, name)
    with open(path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)


def rename_member(path: Path, name: str, new_name: str) -> None:
    """Rename a member in place (same length), fixing the header checksum."""
    assert len(new_name) == len(name)
    member = _member(path, name)
    with open(path, "r+b") as f:
        f.seek(member.offset)
        header = bytearray(f.read(tarfile.BLOCKSIZE))
        header[:len(new_name)] = new_name.encode()
        header[148:156] = b" " * 8
        header[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(header))[0]
        f.seek(member.offset)
        f.write(header)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
