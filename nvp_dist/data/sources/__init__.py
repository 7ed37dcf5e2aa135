"""Readers for the real source formats of the paper's data sets, each returning a `Source`."""
from __future__ import annotations

from typing import Any, Callable

from nvp_dist.data.sources.arrays import cifar10_source, digits_source, imagenet_source
from nvp_dist.data.sources.base import Record, Source, SplitSource
from nvp_dist.data.sources.encoded import celeba_source, folder_source, lsun_source

SOURCE_FORMATS: dict[str, Callable[..., Source]] = {
    "cifar10": cifar10_source,
    "imagenet": imagenet_source,
    "lsun": lsun_source,
    "celeba": celeba_source,
    "folder": folder_source,
    "digits": digits_source,
}


def open_source(source_format: str, input_path: str | None, **options: Any) -> Source:
    """The `Source` of `input_path` in `source_format` (one of SOURCE_FORMATS); options go to its reader
    (only `folder` takes one: `holdout`)."""
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"unknown source format {source_format!r}; one of {', '.join(SOURCE_FORMATS)}")
    return SOURCE_FORMATS[source_format](input_path, **options)


__all__ = ["Record", "Source", "SplitSource", "SOURCE_FORMATS", "open_source"]
