"""The paper's per-data-set image transforms (see ../shared/PAPER_NOTES.md, "Data").

Random choices come in as `aug`, three uniform numbers in [0, 1) drawn by the loader from the sample's
position in the stream (flip, crop row, crop column), so an augmented sample is reproduced exactly after
a resume that skipped everything before it. `aug=None` is evaluation: no flip, centre crops.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

PAPER_SIZE = 64  # LSUN and CelebA are modelled at 64x64
LSUN_SHORT_SIDE = 96
# CelebA's central 148x148 crop of the aligned 218x178 images: rows 40:188, columns 15:163.
CELEBA_BOX = (15, 40, 163, 188)  # PIL order: left, upper, right, lower
# Bilinear, antialiased when shrinking (PIL's resize filters scale their support), like TF's default.
RESAMPLE = Image.Resampling.BILINEAR
FLIPPING = {"flip", "lsun", "celeba"}


def output_hw(transform: str, stored_hw: tuple[int | None, int | None]) -> tuple[int, int]:
    """Height and width of the transform's output for images stored at `stored_hw` (None: varying)."""
    if transform in ("lsun", "celeba"):
        return PAPER_SIZE, PAPER_SIZE
    if None in stored_hw:
        raise ValueError(f"transform {transform!r} keeps the stored size, but the images of this split "
                         "differ in size: use transform lsun or celeba, or resize when converting")
    return stored_hw  # type: ignore[return-value]


def _lsun(img: Image.Image, aug: np.ndarray | None) -> Image.Image:
    w, h = img.size
    scale = LSUN_SHORT_SIDE / min(w, h)
    # max(): rounding must not take the long side below the crop either.
    w, h = max(LSUN_SHORT_SIDE, round(w * scale)), max(LSUN_SHORT_SIDE, round(h * scale))
    img = img.resize((w, h), RESAMPLE)
    if aug is None:
        top, left = (h - PAPER_SIZE) // 2, (w - PAPER_SIZE) // 2
    else:
        top = int(aug[1] * (h - PAPER_SIZE + 1))
        left = int(aug[2] * (w - PAPER_SIZE + 1))
    return img.crop((left, top, left + PAPER_SIZE, top + PAPER_SIZE))


def _celeba(img: Image.Image) -> Image.Image:
    left, upper, right, lower = CELEBA_BOX
    if img.width < right or img.height < lower:
        raise ValueError(f"{img.height}x{img.width} image is smaller than CelebA's crop (rows {upper}:{lower}, "
                         f"columns {left}:{right})")
    return img.crop(CELEBA_BOX).resize((PAPER_SIZE, PAPER_SIZE), RESAMPLE)


def apply_transform(transform: str, img: Image.Image, aug: np.ndarray | None) -> np.ndarray:
    """The transformed image as a uint8 [C, H, W] array; ValueError when the image does not fit it."""
    if transform == "lsun":
        img = _lsun(img, aug)
    elif transform == "celeba":
        img = _celeba(img)
    elif transform not in ("none", "flip"):
        raise ValueError(f"unknown transform {transform!r}")
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if aug is not None and transform in FLIPPING and aug[0] < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array.transpose(2, 0, 1))
