"""Each real source format converts to shards whose images and labels read back byte- or pixel-exact."""
from __future__ import annotations

import json
import subprocess
import tarfile

import numpy as np
import pytest

from tests.data_fixtures import (
    CELEBA_ATTRIBUTES, CIFAR_NAMES, decode, read_shards, write_celeba, write_cifar, write_folder,
    write_imagenet, write_lsun)
from nvp_dist.data import open_source, read_manifest, write_shards
from nvp_dist.data.manifest import sha256_file


def convert(fmt: str, src, out, **kw):
    return write_shards(open_source(fmt, str(src), **kw), out, progress=False)


def check_manifest(out, manifest) -> None:
    """Counts, sizes and hashes match the files; GNU tar lists every member of every shard."""
    on_disk = read_manifest(out)
    assert on_disk == manifest
    for split in manifest.splits.values():
        for shard in split.shards:
            path = out / shard.name
            assert sha256_file(path) == shard.sha256 and path.stat().st_size == shard.bytes
            listing = subprocess.run(["tar", "-tf", str(path)], check=True, capture_output=True, text=True)
            keys = {line.split(".")[0] for line in listing.stdout.split()}
            assert len(keys) == shard.num_samples
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("packed", [False, True])
def test_cifar10_pixels_and_labels_survive(tmp_path, packed):
    expected = write_cifar(tmp_path / "src")
    src = tmp_path / "src"
    if packed:  # the cifar-10-python.tar.gz download itself
        src = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(src, "w:gz") as tar:
            tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    manifest = convert("cifar10", src, tmp_path / "out")
    check_manifest(tmp_path / "out", manifest)
    assert manifest.cond_kind == "class" and manifest.cond_names == CIFAR_NAMES
    for split, (images, labels) in expected.items():
        assert manifest.num_samples(split) == len(images) and manifest.image_shape(split) == (3, 32, 32)
        samples = read_shards(tmp_path / "out", split)
        for i, key in enumerate(sorted(samples)):
            assert np.array_equal(decode(samples[key]["png"]), images[i])
            assert int(samples[key]["cls"]) == labels[i]


def test_imagenet_npz_pixels_and_labels_survive(tmp_path):
    expected = write_imagenet(tmp_path / "src")
    manifest = convert("imagenet", tmp_path / "src", tmp_path / "out")
    check_manifest(tmp_path / "out", manifest)
    assert len(manifest.cond_names) == 1000
    for split, (images, labels) in expected.items():
        assert manifest.image_shape(split) == (3, 8, 8)
        samples = read_shards(tmp_path / "out", split)
        assert len(samples) == len(images)
        for i, key in enumerate(sorted(samples)):
            assert np.array_equal(decode(samples[key]["png"]), images[i])
            assert int(samples[key]["cls"]) == labels[i]  # 0-based
    assert {0, 999} <= {int(s["cls"]) for s in read_shards(tmp_path / "out", "train").values()}


def test_lsun_lmdb_bytes_survive(tmp_path):
    expected = write_lsun(tmp_path / "src")
    manifest = convert("lsun", tmp_path / "src", tmp_path / "out")
    check_manifest(tmp_path / "out", manifest)
    assert manifest.cond_names == ["bedroom", "tower"] and manifest.dataset == "lsun-bedroom-tower"
    for split, records in expected.items():
        assert manifest.image_shape(split) == (3, None, None)  # LSUN sizes vary
        samples = read_shards(tmp_path / "out", split)
        got = {json.loads(s["json"])["id"]: s for s in samples.values()}
        assert len(got) == len(records)
        for key, data, label in records:
            ext = "webp" if data[:4] == b"RIFF" else "jpg"
            assert got[key][ext] == data and int(got[key]["cls"]) == label


def test_single_lsun_category_has_no_labels(tmp_path):
    write_lsun(tmp_path / "src", categories=("church_outdoor",))
    manifest = convert("lsun", tmp_path / "src" / "church_outdoor_val_lmdb", tmp_path / "out")
    assert manifest.cond_kind == "none" and list(manifest.splits) == ["val"]
    assert all("cls" not in s for s in read_shards(tmp_path / "out", "val").values())


def test_celeba_bytes_and_attributes_survive(tmp_path):
    expected = write_celeba(tmp_path / "src")
    manifest = convert("celeba", tmp_path / "src", tmp_path / "out")
    check_manifest(tmp_path / "out", manifest)
    assert manifest.cond_kind == "attributes" and manifest.cond_names == CELEBA_ATTRIBUTES
    for split, records in expected.items():
        assert manifest.image_shape(split) == (3, 218, 178)
        samples = read_shards(tmp_path / "out", split)
        for (name, data, attributes), key in zip(records, sorted(samples), strict=True):
            sample = samples[key]
            assert sample["jpg"] == data
            assert json.loads(sample["json"]) == {"id": name, "attributes": attributes}


def test_folder_classes_bytes_and_reencoding(tmp_path, caplog):
    expected = write_folder(tmp_path / "src")
    manifest = convert("folder", tmp_path / "src", tmp_path / "out")
    check_manifest(tmp_path / "out", manifest)
    assert manifest.cond_names == ["cat", "dog"] and manifest.image_shape("train") == (3, None, None)
    samples = {json.loads(s["json"])["id"]: s for s in read_shards(tmp_path / "out", "train").values()}
    assert set(samples) == set(expected)  # the broken file is skipped...
    assert "cat/broken.jpg" in caplog.text  # ...and logged
    for rel, (cls, data) in expected.items():
        sample = samples[rel]
        assert manifest.cond_names[int(sample["cls"])] == cls
        if rel.endswith(".bmp"):
            assert np.array_equal(decode(sample["png"]), data)  # BMP is re-encoded losslessly
        else:
            ext = {"jpeg": "jpg"}.get(rel.rsplit(".", 1)[1], rel.rsplit(".", 1)[1])
            assert sample[ext] == data


def test_folder_holdout_and_split_folders(tmp_path):
    write_folder(tmp_path / "flat")
    manifest = convert("folder", tmp_path / "flat", tmp_path / "out", holdout=0.4)
    train, test = manifest.num_samples("train"), manifest.num_samples("test")
    assert train + test == 5 and train >= 3 and test >= 1  # 6 files, 2 held out, the broken one skipped
    for split in ("train", "valid"):
        write_folder(tmp_path / "split" / split / "x")
    manifest = convert("folder", tmp_path / "split", tmp_path / "out2")
    assert sorted(manifest.splits) == ["train", "val"] and manifest.cond_names == ["x"]


def test_digits_split_and_values(tmp_path):
    from sklearn.datasets import load_digits

    manifest = write_shards(open_source("digits", "-"), tmp_path, progress=False)
    assert (manifest.num_samples("train"), manifest.num_samples("test")) == (1437, 360)
    assert manifest.image_shape("train") == (1, 8, 8)
    digits = load_digits()
    seen = set()
    for split in ("train", "test"):
        for sample in read_shards(tmp_path, split).values():
            i = int(json.loads(sample["json"])["id"])
            seen.add(i)
            want = [[round(v * 255 / 16) for v in row] for row in digits.images[i]]
            assert decode(sample["png"]).tolist() == want
            assert int(sample["cls"]) == digits.target[i]
    assert seen == set(range(1797))


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_N"):
        open_source("cifar10", str(tmp_path))
    with pytest.raises(ValueError, match="unknown source format"):
        open_source("mnist", str(tmp_path))
