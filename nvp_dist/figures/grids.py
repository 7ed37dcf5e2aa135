"""Image grids, PNG and GIF files: the only place in the figures that touches pixels on disk.

A grid lays uint8 images [N, C, H, W] out row by row with `padding` background pixels between and around
the cells, so an r x c grid is (r*H + (r+1)*padding) x (c*W + (c+1)*padding). Red frames are drawn in that
padding, never over a cell, so a framed image keeps its exact pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PathLike = Union[str, Path]
RED = (255, 0, 0)
WHITE = 255


@dataclass(frozen=True)
class Figure:
    """A written figure file and the model's uint8 images it lays out (shape documented by each figure)."""

    path: Path
    images: torch.Tensor
    note: str = ""  # what the figure could not show as asked (e.g. fractions a model's scales do not allow)


def figure_path(out_dir: PathLike, tag: str, name: str) -> Path:
    """`out_dir/{tag}-{name}`: the tag carries the config name and checkpoint step into the file name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{tag}-{name}"


def _to_numpy(images: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1 or 3, H, W]; got {images.dtype} {images.shape}")
    return images


def image_grid(images: Union[torch.Tensor, np.ndarray], ncol: int, padding: int = 2,
               frames: Collection[int] = ()) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [H', W', C'] grid with ceil(N / ncol) rows.

    C' = C, except that grayscale becomes RGB when `frames` (cell indices, row-major) asks for red frames.
    """
    images = _to_numpy(images)
    if frames and padding < 1:
        raise ValueError("red frames are drawn in the padding: use padding >= 1")
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    out_c = 3 if frames and c == 1 else c
    grid = np.full((nrow * h + (nrow + 1) * padding, ncol * w + (ncol + 1) * padding, out_c), WHITE, np.uint8)
    for i, img in enumerate(images):
        top, left = _cell_origin(i, ncol, h, w, padding)
        grid[top:top + h, left:left + w] = img.transpose(1, 2, 0)  # a 1-channel cell broadcasts to RGB
    for i in frames:
        if not 0 <= i < n:
            raise ValueError(f"frame index {i} outside the {n} cells")
        top, left = _cell_origin(i, ncol, h, w, padding)
        grid[top - padding:top + h + padding, left - padding:left] = RED
        grid[top - padding:top + h + padding, left + w:left + w + padding] = RED
        grid[top - padding:top, left:left + w] = RED
        grid[top + h:top + h + padding, left:left + w] = RED
    return grid


def _cell_origin(i: int, ncol: int, h: int, w: int, padding: int):
    row, col = divmod(i, ncol)
    return padding + row * (h + padding), padding + col * (w + padding)


def label_columns(grid: np.ndarray, labels: Sequence[str], cell: int, padding: int) -> np.ndarray:
    """A grid [H, W, C] of len(labels) columns of `cell` pixels with a text header naming each column.

    Small images (the 8x8 digits) are narrower than a label: the grid is then enlarged by the smallest
    integer factor (nearest neighbour, pixels kept as blocks) that gives every label its column's width.
    """
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [measure.textbbox((0, 0), text, font=font) for text in labels]
    widest, tall = max(b[2] for b in boxes), max(b[3] for b in boxes)
    factor = max(1, -(-(widest + 2) // (cell + padding)))
    grid = grid.repeat(factor, axis=0).repeat(factor, axis=1)
    header = Image.new("RGB", (grid.shape[1], tall + 4), "white")
    draw = ImageDraw.Draw(header)
    for j, (text, box) in enumerate(zip(labels, boxes)):
        centre = factor * (padding + j * (cell + padding) + cell / 2)
        draw.text((centre - box[2] / 2, 1), text, fill="black", font=font)
    head = np.asarray(header.convert("L"))[:, :, None] if grid.shape[2] == 1 else np.asarray(header)
    return np.concatenate([head, grid], axis=0)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    """Two grids [H, W, C] next to each other, top-aligned, `gap` background columns between them."""
    c = max(left.shape[2], right.shape[2])
    left, right = _channels(left, c), _channels(right, c)
    h = max(left.shape[0], right.shape[0])
    out = np.full((h, left.shape[1] + gap + right.shape[1], c), WHITE, np.uint8)
    out[:left.shape[0], :left.shape[1]] = left
    out[:right.shape[0], left.shape[1] + gap:] = right
    return out


def _channels(grid: np.ndarray, c: int) -> np.ndarray:
    return np.repeat(grid, c, axis=2) if grid.shape[2] != c else grid


def _pil(grid: np.ndarray) -> Image.Image:
    return Image.fromarray(grid[:, :, 0], "L") if grid.shape[2] == 1 else Image.fromarray(grid, "RGB")


def save_png(grid: np.ndarray, path: PathLike) -> Path:
    path = Path(path)
    _pil(grid).save(path, format="PNG")
    return path


def save_gif(frames: Sequence[np.ndarray], path: PathLike, duration_ms: int = 120) -> Path:
    """An endlessly looping GIF. Pillow merges consecutive identical frames, so the file may hold fewer
    frames than given when the model maps neighbouring angles to the same pixels."""
    path = Path(path)
    c = max(f.shape[2] for f in frames)  # one mode for all frames: red frames make some of them RGB
    first, *rest = [_pil(_channels(f, c)) for f in frames]
    first.save(path, format="GIF", save_all=True, append_images=rest, duration=duration_ms, loop=0)
    return path
