"""Bad input: corrupt members, a missing member, a truncated or missing shard and wrong-size images are skipped,
counted and logged with shard and key; too many of them abort with a clear error."""
from __future__ import annotations

import json
import logging
from itertools import islice

import numpy as np
import pytest

from nvp_dist.data import DataConfig, DataError, eval_batches, read_manifest, train_batches, write_shards
from nvp_dist.data.sources import Source, SplitSource
from nvp_dist.data.sources.base import Record, png_bytes
from tests.data_fixtures import corrupt_member, rename_member, rng_images, write_tiny


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[str, set[str]]:
    """The tiny data set with four kinds of damage in its train split; returns (path, bad keys)."""
    out = write_tiny(tmp_path_factory.mktemp("damaged"))
    shards = read_manifest(out).splits["train"].shards
    first, second, last = shards[0].name, shards[1].name, shards[-2]
    (out / shards[-1].name).unlink()
    corrupt_member(out / first, "00000003.png")
    rename_member(out / second, f"{shards[0].num_samples + 1:08d}.png", f"{shards[0].num_samples + 1:08d}.pnx")
    start = sum(s.num_samples for s in shards[:-2])
    # Cut the shard 100 bytes into its second piece: that piece's samples and all after them are lost.
    with open(out / last.name, "r+b") as f:
        f.truncate(last.offsets[1] + 100)
    bad = {f"{first}/00000003", f"{second}/{shards[0].num_samples + 1:08d}"}
    bad |= {f"{last.name}/{start + i:08d}" for i in range(8, last.num_samples)}
    bad |= {f"{shards[-1].name}/{150 - shards[-1].num_samples + i:08d}" for i in range(shards[-1].num_samples)}
    return str(out), bad


def config(path, **kw) -> DataConfig:
    return DataConfig(**{"path": path, "num_workers": 0, "shuffle_buffer": 32, "max_bad_fraction": 1.0, **kw})


def test_eval_marks_exactly_the_bad_samples_invalid(damaged, caplog):
    path, bad = damaged
    caplog.set_level(logging.WARNING, logger="nvp_dist.data")
    batches = list(eval_batches(config(path, num_workers=2), "train", 16))
    good = [k for b in batches for k, v in zip(b.keys, b.valid) if v]
    assert len(good) == 150 - len(bad) and not set(good) & bad
    assert sum(b.bad for b in batches) == len(bad)
    for key in bad:
        assert key in caplog.text
    assert "undecodable .png" in caplog.text and "no image member" in caplog.text
    assert "missing from shard (the shard ends before it" in caplog.text and "(FileNotFoundError" in caplog.text


def test_training_replaces_bad_samples_and_counts_each_once_per_round(damaged, caplog):
    path, bad = damaged
    caplog.set_level(logging.WARNING, logger="nvp_dist.data")
    batches = list(islice(train_batches(config(path), 10, seed=2), 15))  # one round: every position once
    keys = [k for b in batches for k in b.keys]
    assert all(b.valid.all() and b.images.shape[0] == 10 for b in batches)
    assert not set(keys) & bad and sum(b.bad for b in batches) == len(bad)
    assert sum(key in caplog.text for key in bad) == len(bad)
    # replacements are part of the deterministic stream: a resume reproduces them
    resumed = list(islice(train_batches(config(path), 10, seed=2, start_batch=6), 9))
    assert [b.keys for b in batches[6:]] == [b.keys for b in resumed]
    assert [b.bad for b in batches[6:]] == [b.bad for b in resumed]


def test_abort_threshold_names_shard_and_fraction(damaged):
    path, bad = damaged
    message = r"were bad \(\d+\.\d% > data.max_bad_fraction 5.0%\); last bad: train-"
    with pytest.raises(DataError, match=message):
        for _ in islice(train_batches(config(path, max_bad_fraction=0.05, bad_min_seen=20), 10, seed=2), 30):
            pass
    # below bad_min_seen a stream does not abort yet...
    list(islice(train_batches(config(path, max_bad_fraction=0.0, bad_min_seen=10_000), 10, seed=2), 15))
    # ...but an evaluation judges the whole split at its end
    with pytest.raises(DataError, match="split 'train'"):
        list(eval_batches(config(path, max_bad_fraction=0.03, bad_min_seen=10_000), "train", 16))


def test_wrong_size_image_is_bad(tmp_path, caplog):
    images = rng_images(12, 8, 8)
    records = [Record(str(i), png_bytes(images[i]), 0) for i in range(12)]
    records[4] = Record("odd", png_bytes(rng_images(1, 9, 8)[0]), 0)
    source = Source("mixed", "folder", "class", ["a"], {"test": SplitSource(12, lambda: iter(records))})
    write_shards(source, tmp_path, progress=False)
    # A manifest that promises 8x8 (as one written before the odd image was slipped into the shard would)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["test"]["image_shape"] = [3, 8, 8]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    batches = list(eval_batches(config(str(tmp_path)), "test", 12))
    assert batches[0].valid.tolist() == [i != 4 for i in range(12)] and batches[0].bad == 1
    assert "wrong size 9x8" in caplog.text and "test-000000.tar/00000004" in caplog.text
    assert np.array_equal(batches[0].images[5].numpy(), images[5].transpose(2, 0, 1))


def test_all_bad_chunk_is_a_clear_error(tmp_path):
    records = [Record(str(i), png_bytes(rng_images(1, 8, 8, seed=i)[0]), None) for i in range(4)]
    source = Source("s", "folder", "none", [], {"train": SplitSource(4, lambda: iter(records))})
    write_shards(source, tmp_path, progress=False)
    for i in range(4):
        corrupt_member(tmp_path / "train-000000.tar", f"{i:08d}.png")
    with pytest.raises(DataError, match="every sample of training chunk 0"):
        next(train_batches(config(str(tmp_path), cond="none"), 2))
