"""Latent spheres through real images (the paper's Equation 19, Figures 6 and 12-16, and the animated
eight-image version of its visualisation page).

Equation 19, for the embeddings z1..z4 of four images, phi across the columns and phi' down the rows:
    z = cos(phi) (z1 cos(phi') + z2 sin(phi')) + sin(phi) (z3 cos(phi') + z4 sin(phi'))
on the paper's angles phi, phi' in {0, 2 pi/m, ..., 2 pi (m-1)/m} (m = 8 gives its {0, pi/4, ..., 7 pi/4}).
The sources sit where both angles are 0 or pi/2, so m must divide by 4; their cells are framed in red.

The animation adds a third angle and four more images. The visualisation page prints cos(phi) before both
halves, which is no sphere (every point at phi = pi/2 would be zero); we take the evident reading
    z = cos(phi) S(z1..z4) + sin(phi) S(z5..z8)
with S the four-image grid above. Frame t shows phi = 2 pi t / frames: frame 0 is exactly the four-image
figure of z1..z4, frame frames/4 the one of z5..z8 (both with their sources framed), and the loop closes
through the antipodes -z1..-z4 and -z5..-z8.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from nvp_dist.figures.grids import Figure, PathLike, figure_path, image_grid, save_gif, save_png
from nvp_dist.figures.latents import decode, encode


def _angles(m: int) -> torch.Tensor:
    # float64 so that the angle-0 weights are exactly 1 and 0 and the first cell decodes z1 itself.
    return 2 * math.pi * torch.arange(m, dtype=torch.float64) / m


def sphere_weights(m: int) -> torch.Tensor:
    """[m*m, 4] weights of (z1, z2, z3, z4) at every cell of Equation 19's grid, row-major."""
    a = _angles(m)
    phi, phi2 = a.view(1, m), a.view(m, 1)  # phi varies along a row, phi' down a column
    cols = [torch.cos(phi) * torch.cos(phi2), torch.cos(phi) * torch.sin(phi2),
            torch.sin(phi) * torch.cos(phi2), torch.sin(phi) * torch.sin(phi2)]
    return torch.stack(cols, dim=-1).view(m * m, 4)


def _source_cells(m: int) -> List[int]:
    """Cells where the grid passes through z1, z2, z3, z4: angles (0, 0), (0, pi/2), (pi/2, 0), (pi/2, pi/2)."""
    q = m // 4
    return [0, q * m, q, q * m + q]


def _mix(zs: Sequence[torch.Tensor], weights: torch.Tensor) -> List[torch.Tensor]:
    """Per scale, the weighted sums weights [P, K] @ z [K, ...] -> [P, ...]."""
    return [torch.einsum("pk,k...->p...", weights.to(z.dtype).to(z.device), z) for z in zs]


def _check(images: torch.Tensor, count: int, m: int, frames: int = 4) -> None:
    if images.shape[0] != count:
        raise ValueError(f"this manifold is spanned by {count} images; got {images.shape[0]}")
    if m % 4 or frames % 4:
        raise ValueError(f"the sources lie at angle pi/2: m ({m}) and frames ({frames}) must divide by 4")


def _expand(cond: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    return None if cond is None else cond.reshape(1, -1).expand(n, -1)


def _sources_cond(cond: Optional[torch.Tensor], k: int) -> Optional[torch.Tensor]:
    """[k, cond_dim] per source image: its own row of a [k, cond_dim] cond, or one shared [cond_dim]."""
    if cond is None or cond.dim() == 1:
        return _expand(cond, k)
    if cond.shape[0] != k:
        raise ValueError(f"cond must be [{k}, cond_dim] (one per image) or [cond_dim]; got {tuple(cond.shape)}")
    return cond.float()


def _points_cond(cond: Optional[torch.Tensor], weights: torch.Tensor) -> Optional[torch.Tensor]:
    """The conditioning of every grid point. Shared: that vector. Per image: the blend of the sources'
    vectors by the squared sphere weights, which are >= 0 and sum to 1 on the sphere, so a point lies among
    its sources' attributes (a soft class between one-hot ones) and a source cell gets its own vector."""
    if cond is None or cond.dim() == 1:
        return _expand(cond, weights.shape[0])
    return (weights.to(torch.float64) ** 2).to(cond.device).float() @ cond.float()


def manifold(model: nn.Module, images: torch.Tensor, m: int = 8, out_dir: PathLike = ".", tag: str = "model",
             cond: Optional[torch.Tensor] = None, batch_size: int = 64, padding: int = 2) -> Figure:
    """`{tag}-manifold.png`: Equation 19 through four uint8 images [4, C, H, W] on an m x m grid.

    `cond`, for a conditional model: [4, cond_dim], each image's own vector (a grid point decodes under the
    blend of its sources' vectors, see _points_cond), or [cond_dim] shared by all.
    Figure.images: uint8 [m, m, C, H, W], rows phi', columns phi; [0, 0] decodes z1.
    """
    _check(images, 4, m)
    zs = encode(model, images, _sources_cond(cond, 4))
    weights = sphere_weights(m)
    grid = decode(model, _mix(zs, weights), _points_cond(cond, weights), batch_size)
    path = save_png(image_grid(grid, m, padding, frames=_source_cells(m)), figure_path(out_dir, tag, "manifold.png"))
    return Figure(path, grid.view(m, m, *grid.shape[1:]))


def manifold_animation(model: nn.Module, images: torch.Tensor, m: int = 8, frames: int = 16,
                       out_dir: PathLike = ".", tag: str = "model", cond: Optional[torch.Tensor] = None,
                       batch_size: int = 64, padding: int = 2, duration_ms: int = 120) -> Figure:
    """`{tag}-manifold.gif`: the three-angle sphere through eight uint8 images [8, C, H, W], one m x m
    grid per frame (see the module docstring). Decodes frames * m * m images. `cond` as for `manifold`,
    with [8, cond_dim] for per-image vectors.
    Figure.images: uint8 [frames, m, m, C, H, W].
    """
    _check(images, 8, m, frames)
    zs = encode(model, images, _sources_cond(cond, 8))
    inner = sphere_weights(m)
    decoded, pictures = [], []
    for t in range(frames):
        phi = 2 * math.pi * t / frames
        weights = torch.cat([math.cos(phi) * inner, math.sin(phi) * inner], dim=1)
        grid = decode(model, _mix(zs, weights), _points_cond(cond, weights), batch_size)
        sources = _source_cells(m) if 4 * t in (0, frames) else []
        decoded.append(grid.view(m, m, *grid.shape[1:]))
        pictures.append(image_grid(grid, m, padding, frames=sources))
    path = save_gif(pictures, figure_path(out_dir, tag, "manifold.gif"), duration_ms)
    return Figure(path, torch.stack(decoded))
