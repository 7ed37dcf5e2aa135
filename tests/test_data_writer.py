"""Shard writing: size bound, piece offsets, atomicity under a crash, reproducibility, --verify, the CLI."""
from __future__ import annotations

import tarfile
import time

import pytest

from nvp_dist.cli import main
from nvp_dist.data import read_manifest, verify_shards, write_shards
from nvp_dist.data.cli import parse_size
from nvp_dist.data.sources import Record, Source, SplitSource
from tests.data_fixtures import corrupt_member, tiny_source, write_tiny


def test_shards_are_bounded_and_offsets_point_at_samples(tmp_path):
    manifest = read_manifest(write_tiny(tmp_path, max_shard_bytes=40_960, index_every=8))
    shards = manifest.splits["train"].shards
    assert len(shards) > 3 and sum(s.num_samples for s in shards) == 150
    start = 0  # split index of the shard's first sample: keys count through the whole split
    for shard in shards:
        path = tmp_path / shard.name
        assert shard.bytes <= 40_960 and path.stat().st_size == shard.bytes
        assert len(shard.offsets) == -(-shard.num_samples // 8)
        with open(path, "rb") as f:
            for piece, offset in enumerate(shard.offsets):
                f.seek(offset)
                header = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
                assert header.name.startswith(f"{start + 8 * piece:08d}.")
        start += shard.num_samples


def test_conversion_is_byte_reproducible(tmp_path):
    a = write_tiny(tmp_path / "a")
    b = write_tiny(tmp_path / "b")
    assert read_manifest(a).splits == read_manifest(b).splits


def test_rewrite_removes_shards_of_the_earlier_conversion(tmp_path):
    write_tiny(tmp_path, max_shard_bytes=40_960)
    (tmp_path / "other-000000.tar").write_bytes(b"not ours")
    manifest = read_manifest(write_tiny(tmp_path, max_shard_bytes=10_000_000))
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["other-000000.tar", "test-000000.tar",
                                                              "train-000000.tar"]
    assert verify_shards(tmp_path) == [] and manifest.num_samples("train") == 150


def test_crash_leaves_no_partial_shard_and_no_manifest(tmp_path):
    good = list(tiny_source(n_train=40).splits["train"].records())

    def records():
        yield from good
        raise KeyboardInterrupt  # the process dies mid-shard

    source = Source("crash", "digits", "class", [f"c{i}" for i in range(5)],
                    {"train": SplitSource(41, records)})
    with pytest.raises(KeyboardInterrupt):
        write_shards(source, tmp_path, max_shard_bytes=40_960, progress=False)
    finished = sorted(p.name for p in tmp_path.iterdir())
    assert finished and all(name.startswith("train-") for name in finished)  # no manifest, no temp file
    for name in finished:  # each completed shard is a whole, readable tar
        with tarfile.open(tmp_path / name) as tar:
            assert len(tar.getmembers()) % 3 == 0


def test_unreadable_record_is_skipped(tmp_path, caplog):
    records = [Record("fine", next(tiny_source().splits["test"].records()).data, 1),
               Record("garbage", b"\x89PNG but not really", 2),
               Record("gone", tmp_path / "missing.png", 3)]
    source = Source("s", "folder", "class", list("abcd"), {"test": SplitSource(3, lambda: iter(records))})
    manifest = write_shards(source, tmp_path / "out", progress=False)
    assert manifest.num_samples("test") == 1
    assert "garbage" in caplog.text and "gone" in caplog.text


def test_verify_reports_tampered_and_missing_shards(tmp_path, capsys):
    out = write_tiny(tmp_path)
    assert main(["shards", "--verify", str(out)]) == 0
    manifest = read_manifest(out)
    shard = manifest.splits["train"].shards[1]
    corrupt_member(out / shard.name, f"{manifest.splits['train'].shards[0].num_samples:08d}.png")
    (out / manifest.splits["test"].shards[0].name).unlink()
    capsys.readouterr()
    assert main(["shards", "--verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert f"{shard.name} sha256" in report and f"{manifest.splits['test'].shards[0].name} is missing" in report
    assert len(verify_shards(out)) == 2


def test_cli_writes_digits_in_seconds(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["shards", "digits", "-", str(tmp_path / "digits"), "--no-progress"]) == 0
    assert time.perf_counter() - start < 15
    assert "train: 1437 images" in capsys.readouterr().out
    assert main(["shards", "digits", str(tmp_path / "d2"), "--no-progress", "--max-shard-size", "1MB"]) == 0
    assert len(read_manifest(tmp_path / "d2").splits["train"].shards) == 5


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["shards", "--verify", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert main(["shards", "cifar10", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "data_batch_N" in capsys.readouterr().err
    assert (parse_size("500MB"), parse_size("64k"), parse_size("1GiB"), parse_size("123")) == \
        (500_000_000, 64_000, 2**30, 123)
