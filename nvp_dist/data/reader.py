"""Read samples of a shard from the tar bytes, and decode one sample into arrays.

Nothing here raises on bad data: a sample that cannot be read comes back as the reason why, and decoding
raises `BadSample`, so that the loader can skip, count and log it with its shard and key.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from nvp_dist.data.manifest import Manifest, open_url
from nvp_dist.data.plan import Segment, SplitLayout
from nvp_dist.data.transforms import apply_transform

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class BadSample(Exception):
    """A sample that cannot be used: missing, undecodable, of the wrong size, or without its label."""


@dataclass
class RawSample:
    shard: str  # shard file name
    key: str
    members: dict[str, bytes]  # extension -> bytes; empty when the sample was not found
    problem: str = ""  # why members may be incomplete (the read stopped early), "" when the read was clean


class SplitReader:
    """Reads segments of one split's shards, starting each read at the nearest recorded piece offset."""

    def __init__(self, manifest: Manifest, split: str, layout: SplitLayout):
        self.manifest, self.split, self.layout = manifest, manifest.split(split), layout

    def read(self, segment: Segment) -> list[RawSample]:
        shard = self.split.shards[segment.shard]
        first = int(self.layout.shard_start[segment.shard]) + segment.start
        samples = [RawSample(shard.name, f"{first + i:08d}", {}) for i in range(segment.count)]
        last = first + segment.count - 1
        piece = segment.start // self.manifest.index_every
        problem = ""
        try:
            with open_url(self.manifest.shard_url(shard), shard.offsets[piece]) as f, \
                    tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if not key.isdigit() or not member.isfile():
                        continue
                    index = int(key)
                    if index > last:
                        break
                    if index >= first:
                        samples[index - first].members[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            # A missing, truncated or corrupt shard: keep what was read; the rest is reported missing.
            problem = f"{type(err).__name__}: {err}"
        for s in samples:
            s.problem = problem
        return samples


class SampleDecoder:
    """Turns a sample's members into a uint8 [C, H, W] image (after the transform) and its condition."""

    def __init__(self, manifest: Manifest, split: str, transform: str, cond: str):
        self.channels, self.height, self.width = manifest.image_shape(split)
        self.transform, self.cond = transform, cond
        self.cond_dim = len(manifest.cond_names) if cond != "none" else 0

    def __call__(self, sample: RawSample, aug: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        exts = [e for e in IMAGE_EXTS if e in sample.members]
        if not sample.members:
            raise BadSample(f"missing from shard ({sample.problem or 'the shard ends before it: truncated?'})")
        if not exts:
            raise BadSample(f"no image member{f' ({sample.problem})' if sample.problem else ''}")
        try:
            with Image.open(io.BytesIO(sample.members[exts[0]])) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")  # convert() decodes the pixels
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise BadSample(f"undecodable .{exts[0]}: {err}") from None
        if self.height is not None and (img.height, img.width) != (self.height, self.width):
            raise BadSample(f"wrong size {img.height}x{img.width}, the split's images are "
                            f"{self.height}x{self.width}")
        try:
            image = apply_transform(self.transform, img, aug)
        except ValueError as err:
            raise BadSample(str(err)) from None
        return image, self._condition(sample)

    def _condition(self, sample: RawSample) -> np.ndarray | None:
        if self.cond == "none":
            return None
        out = np.zeros(self.cond_dim, dtype=np.float32)
        try:
            if self.cond == "class":
                label = int(sample.members["cls"])
                if not 0 <= label < self.cond_dim:
                    raise ValueError(f"label {label} outside 0..{self.cond_dim - 1}")
                out[label] = 1.0
            else:
                values = json.loads(sample.members["json"])["attributes"]
                if len(values) != self.cond_dim:
                    raise ValueError(f"{len(values)} attributes, expected {self.cond_dim}")
                out[:] = values
        except (KeyError, ValueError, TypeError) as err:
            raise BadSample(f"bad {self.cond} label: {type(err).__name__}: {err}") from None
        return out
