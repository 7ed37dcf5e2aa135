"""The loader in one process: reproducible, resumable training streams; exactly-once evaluation; the
paper's transforms; clear errors."""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import threading
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from nvp_dist.data import (
    DataConfig, DataError, cond_dim, eval_batches, open_source, output_shape, read_manifest, train_batches,
    write_shards)
from tests.data_fixtures import decode, read_shards, write_celeba, write_lsun, write_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"))


def config(path, **kw) -> DataConfig:
    return DataConfig(**{"path": str(path), "num_workers": 0, "shuffle_buffer": 32, "cond": "class", **kw})


def same(a, b) -> bool:
    return a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.cond, b.cond)


def test_train_stream_is_reproducible_and_resumes_exactly(tiny):
    cfg = config(tiny, transform="flip")
    reference = list(islice(train_batches(cfg, 16, seed=3), 24))  # 384 positions: 2.5 rounds of 150
    assert all(b.images.shape == (16, 3, 8, 8) and b.cond.shape == (16, 5) and b.valid.all() for b in reference)
    # The worker count does not change the stream: chunks are a function of (seed, rank, chunk) alone.
    with_workers = list(islice(train_batches(config(tiny, transform="flip", num_workers=2), 16, seed=3), 24))
    assert all(same(a, b) for a, b in zip(reference, with_workers, strict=True))
    for k in (1, 2, 9, 17):  # mid-chunk and across rounds
        resumed = list(islice(train_batches(cfg, 16, seed=3, start_batch=k), 24 - k))
        assert all(same(a, b) for a, b in zip(reference[k:], resumed, strict=True))
    other_seed = next(train_batches(cfg, 16, seed=4))
    other_rank = next(train_batches(cfg, 16, seed=3, rank=1, world_size=2))
    assert other_seed.keys != reference[0].keys and other_rank.keys != reference[0].keys


def test_each_round_sees_every_sample_once(tiny):
    keys = [k for b in islice(train_batches(config(tiny), 10, seed=1), 30) for k in b.keys]
    assert len(set(keys[:150])) == 150 and set(keys[:150]) == set(keys[150:])
    assert keys[:150] != keys[150:]  # each round in its own order


def test_flips_are_random_but_images_unchanged_otherwise(tiny):
    stored = {key: decode(s["png"]).transpose(2, 0, 1) for key, s in read_shards(tiny, "train").items()}
    flipped = plain = 0
    for batch in islice(train_batches(config(tiny, transform="flip"), 50, seed=0), 3):
        for key, image in zip(batch.keys, batch.images.numpy()):
            original = stored[key]
            plain += np.array_equal(image, original)
            flipped += np.array_equal(image, original[:, :, ::-1])
    assert plain + flipped == 150 and 40 < flipped < 110


@pytest.mark.parametrize("world_size,batch_size,workers", [(1, 16, 2), (2, 7, 0), (3, 5, 2), (50, 4, 0)])
def test_eval_sees_every_sample_once_with_equal_batch_counts(tiny, world_size, batch_size, workers):
    cfg = config(tiny, num_workers=workers, shuffle_buffer=9)
    per_rank = [list(eval_batches(cfg, "test", batch_size, rank=r, world_size=world_size))
                for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # 37 samples: ranks 0..36 of 50 hold one
    keys = [k for batches in per_rank for b in batches for k, v in zip(b.keys, b.valid) if v]
    assert len(keys) == 37 and len(set(keys)) == 37
    assert all(b.bad == 0 and b.images.shape[0] == batch_size for bs in per_rank for b in bs)


def test_eval_images_and_labels_are_exact(tiny):
    stored = read_shards(tiny, "test")
    batches = list(eval_batches(config(tiny), "test", 8))
    for batch in batches:
        for key, image, cond, valid in zip(batch.keys, batch.images, batch.cond, batch.valid):
            if valid:
                sample = stored[key]
                assert np.array_equal(image.numpy(), decode(sample["png"]).transpose(2, 0, 1))
                assert cond.argmax() == int(sample["cls"]) and cond.sum() == 1
            else:
                assert key == "" and not image.any() and not cond.any()


def test_lsun_transform_centre_and_random_crops(tmp_path):
    write_lsun(tmp_path / "src")
    write_shards(open_source("lsun", str(tmp_path / "src")), tmp_path / "out", progress=False)
    cfg = config(tmp_path / "out", transform="lsun", eval_split="val")
    manifest = read_manifest(cfg.path)
    assert output_shape(cfg, manifest) == (3, 64, 64) and cond_dim(cfg, manifest) == 2
    stored = read_shards(tmp_path / "out", "val")
    batch = next(eval_batches(cfg, "val", 4))
    for key, image in zip(batch.keys, batch.images):
        sample = stored[key]
        img = Image.open(io.BytesIO(sample.get("jpg") or sample["webp"])).convert("RGB")
        scale = 96 / min(img.size)
        w, h = max(96, round(img.width * scale)), max(96, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BILINEAR)
        top, left = (h - 64) // 2, (w - 64) // 2
        want = np.asarray(img.crop((left, top, left + 64, top + 64))).transpose(2, 0, 1)
        assert np.array_equal(image.numpy(), want)
    train = next(train_batches(cfg, 8, seed=0))
    assert train.images.shape == (8, 3, 64, 64)


def test_celeba_transform_and_attributes(tmp_path):
    expected = write_celeba(tmp_path / "src")
    write_shards(open_source("celeba", str(tmp_path / "src")), tmp_path / "out", progress=False)
    cfg = config(tmp_path / "out", transform="celeba", cond="attributes")
    batch = next(eval_batches(cfg, "train", 3))
    for (name, data, attributes), image, cond in zip(expected["train"], batch.images, batch.cond):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        want = np.asarray(img.crop((15, 40, 163, 188)).resize((64, 64), Image.Resampling.BILINEAR))
        assert np.array_equal(image.numpy(), want.transpose(2, 0, 1))
        assert cond.tolist() == attributes
    assert next(train_batches(cfg, 5, seed=0)).cond.shape == (5, 40)


def test_clear_errors(tmp_path, tiny):
    with pytest.raises(DataError, match=str(tmp_path / "absent")):
        read_manifest(tmp_path / "absent")
    with pytest.raises(DataError, match="split 'nope'"):
        next(eval_batches(config(tiny), "nope", 4))
    with pytest.raises(DataError, match="data.cond=attributes"):
        next(train_batches(config(tiny, cond="attributes"), 4))
    with pytest.raises(ValueError, match="data.transform must be one of"):
        next(train_batches(config(tiny, transform="jitter"), 4))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text('{"format_version": 1, "splits": ')
    with pytest.raises(DataError, match="invalid manifest .*broken"):
        read_manifest(tmp_path / "broken")


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Answers `Range: bytes=N-` with 206 like an object store (Python 3.11's server ignores ranges)."""
    ranges: list[int] = []

    def send_head(self):
        if "Range" not in self.headers:
            return super().send_head()
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
        self.ranges.append(start)
        f = open(self.translate_path(self.path), "rb")
        size = os.fstat(f.fileno()).st_size
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f


@pytest.mark.parametrize("handler", [http.server.SimpleHTTPRequestHandler, _RangeHandler])
def test_reads_over_http(tiny, handler):
    """With range support pieces are fetched from their offsets; without, the bytes before are dropped."""
    _RangeHandler.ranges.clear()
    handler = type("Quiet", (handler,), {"log_message": lambda *args: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(tiny)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert json.loads((tiny / "manifest.json").read_text())["dataset"] == read_manifest(url).dataset
        remote = list(eval_batches(config(url, shuffle_buffer=20), "test", 8))
        local = list(eval_batches(config(tiny, shuffle_buffer=20), "test", 8))
        assert all(same(a, b) for a, b in zip(local, remote, strict=True))
        assert same(next(train_batches(config(url), 8, start_batch=5)),
                    next(train_batches(config(tiny), 8, start_batch=5)))
    finally:
        server.shutdown()
        server.server_close()
    assert bool(_RangeHandler.ranges) == (handler.__mro__[1] is _RangeHandler)
