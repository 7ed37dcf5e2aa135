"""Drawing the paper's Figure 1 with Pillow: four square panels in one PNG.

    x ~ data (grid)             | z = f(x) (the grid warped by f)
    x = f^-1(z) (grid warped)   | z ~ N(0, I) (grid)

as the paper lays them out: inference runs along the top row, generation right to left along the bottom.
Points are coloured by their first coordinate in the space they were drawn in, so the colours show where f
and f^-1 send each region. Both X panels share one square window around the data, both Z panels [-4, 4]^2.
Pillow rather than matplotlib: it is already a dependency, and the figure needs only dots and polylines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PointMap = Callable[[np.ndarray], np.ndarray]  # points [N, 2] -> points [N, 2]
Window = Tuple[float, float, float]  # centre x, centre y, half-width

Z_WINDOW: Window = (0.0, 0.0, 4.0)
Z_GRID_HALF = 3.0
LINE_COLOURS = ((110, 150, 215), (225, 150, 95))  # lines of constant first / second coordinate
POINT_COLOURS = (np.array([30, 60, 190]), np.array([215, 45, 35]))  # low / high first coordinate
BORDER = (160, 160, 160)


def grid_lines(lo: np.ndarray, hi: np.ndarray, count: int, samples: int) -> List[np.ndarray]:
    """`count` lines of constant first coordinate, then `count` of constant second, over the box [lo, hi],
    each as `samples` points [samples, 2] (dense, so that their images under a flow stay smooth)."""
    t = np.linspace(0.0, 1.0, samples)
    lines = []
    for axis in (0, 1):
        for level in np.linspace(lo[axis], hi[axis], count):
            line = np.empty((samples, 2))
            line[:, axis] = level
            line[:, 1 - axis] = lo[1 - axis] + t * (hi[1 - axis] - lo[1 - axis])
            lines.append(line)
    return lines


def _colours(points: np.ndarray) -> np.ndarray:
    u = points[:, 0]
    s = (u - u.min()) / max(u.max() - u.min(), 1e-12)
    low, high = POINT_COLOURS
    return (low + s[:, None] * (high - low)).astype(np.uint8)


def _to_pixels(points: np.ndarray, window: Window, size: int) -> np.ndarray:
    cx, cy, half = window
    px = (points[:, 0] - cx + half) / (2 * half) * (size - 1)
    py = (1 - (points[:, 1] - cy + half) / (2 * half)) * (size - 1)  # image rows grow downwards
    return np.stack([px, py], axis=1)


def _draw_polyline(draw: ImageDraw.ImageDraw, pixels: np.ndarray, colour, size: int) -> None:
    # A flow can send part of a line far outside the window; draw only the runs that stay near it, since
    # clamping the far points would bend the visible part of the line.
    near = np.all(np.abs(pixels - size / 2) < 2 * size, axis=1)
    start = None
    for i, ok in enumerate(np.append(near, False)):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if i - start > 1:
                draw.line([tuple(p) for p in pixels[start:i]], fill=colour, width=1)
            start = None


def _panel(title: str, points: np.ndarray, colours: np.ndarray, lines: List[np.ndarray], window: Window,
           size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        _draw_polyline(draw, _to_pixels(line, window, size), LINE_COLOURS[i * 2 // len(lines)], size)
    for (x, y), colour in zip(_to_pixels(points, window, size), colours):
        draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=tuple(int(c) for c in colour))
    draw.rectangle([0, 0, size - 1, size - 1], outline=BORDER)
    draw.text((6, 4), title, fill="black", font=ImageFont.load_default())
    return img


def draw_figure_1(f: PointMap, f_inv: PointMap, x: np.ndarray, z: np.ndarray, path: Path, panel_px: int = 320,
                  lines: int = 9, line_samples: int = 200) -> Path:
    """Write the four panels (a 2*panel_px square PNG) for data points x [N, 2] and latent samples z [M, 2]."""
    lo, hi = x.min(0), x.max(0)
    x_window: Window = (*((lo + hi) / 2), 0.6 * float((hi - lo).max()))
    x_lines = grid_lines(lo, hi, lines, line_samples)
    z_lines = grid_lines(np.full(2, -Z_GRID_HALF), np.full(2, Z_GRID_HALF), lines, line_samples)
    x_colours, z_colours = _colours(x), _colours(z)
    panels = [
        _panel("X: x ~ data", x, x_colours, x_lines, x_window, panel_px),
        _panel("Z: z = f(x)", f(x), x_colours, [f(line) for line in x_lines], Z_WINDOW, panel_px),
        _panel("X: x = f^-1(z)", f_inv(z), z_colours, [f_inv(line) for line in z_lines], x_window, panel_px),
        _panel("Z: z ~ N(0, I)", z, z_colours, z_lines, Z_WINDOW, panel_px),
    ]
    figure = Image.new("RGB", (2 * panel_px, 2 * panel_px), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, ((i % 2) * panel_px, (i // 2) * panel_px))
    figure.save(path, format="PNG")
    return path
