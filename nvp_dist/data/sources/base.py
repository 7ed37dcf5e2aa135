"""What every source reader hands to the shard writer: records of encoded images with their labels."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Record:
    # The source's own name for the sample (file name, LMDB key, row of a batch), kept in the .json member
    # so that a bad sample found while training can be traced back to the original data.
    source_id: str
    # Encoded image bytes, or a file to read them from (a missing file is then skipped by the writer).
    data: bytes | Path
    label: int | None = None
    attributes: list[int] | None = None


@dataclass(frozen=True)
class SplitSource:
    count: int  # expected number of records (the progress bar's total)
    records: Callable[[], Iterator[Record]]


@dataclass(frozen=True)
class Source:
    dataset: str
    source_format: str
    cond_kind: str  # none | class | attributes
    cond_names: list[str]
    splits: dict[str, SplitSource]


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an [H, W] (grayscale) or [H, W, 3] uint8 array; lossless, so pixels round-trip exactly."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def array_split(images: np.ndarray, labels: np.ndarray | None, ids: list[str]) -> SplitSource:
    """A split held in memory as uint8 arrays; PNGs are encoded lazily, one record at a time."""
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")

    def records() -> Iterator[Record]:
        for i, source_id in enumerate(ids):
            label = None if labels is None else int(labels[i])
            yield Record(source_id, png_bytes(images[i]), label)

    return SplitSource(len(ids), records)


def chained_split(parts: list[Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]],
                  count: int) -> SplitSource:
    """A split spread over several files (CIFAR batches, ImageNet npz parts) loaded one at a time, so that
    only one part is in memory while it is written."""

    def records() -> Iterator[Record]:
        for load in parts:
            images, labels, ids = load()
            yield from array_split(images, labels, ids).records()

    return SplitSource(count, records)
