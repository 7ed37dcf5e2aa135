"""Conceptual compression (the paper's Figures 22-26): keep an image's coarsest latents, resample the rest.

The multiscale model factors out half of the remaining variables at every scale but the last, so with L
scales the latents hold D/2, D/4, ..., D/2^(L-1), D/2^(L-1) of the D variables, finest first. Keeping the
j coarsest of them keeps 1/2^(L-j) of the variables: the fractions a model can show are 1, 1/2, ...,
1/2^(L-1) (the paper's 100% to 6.25% are a five-scale model's).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from nvp_dist.figures.grids import Figure, PathLike, figure_path, image_grid, save_png
from nvp_dist.figures.latents import decode, encode, generator_for


def kept_fractions(latent_sizes: Sequence[int]) -> List[float]:
    """Fraction of all latent variables held by the j coarsest latents, for j = all of them down to 1."""
    total = sum(latent_sizes)
    return [sum(latent_sizes[start:]) / total for start in range(len(latent_sizes))]


def _coarsest_count(latent_sizes: Sequence[int], fraction: float) -> int:
    available = kept_fractions(latent_sizes)
    for start, kept in enumerate(available):
        if math.isclose(kept, fraction, rel_tol=1e-9):
            return len(latent_sizes) - start
    raise ValueError(f"keeping {fraction:g} of the latents needs a scale boundary there; "
                     f"this model's scales allow {[f'{f:g}' for f in available]}")


def keep_coarsest(zs: Sequence[torch.Tensor], count: int, temperature: float,
                  generator: torch.Generator) -> List[torch.Tensor]:
    """zs with all but the `count` coarsest latents replaced by draws from N(0, T^2 I)."""
    fine = len(zs) - count
    return [temperature * torch.randn(z.shape, generator=generator, device=z.device) if i < fine else z
            for i, z in enumerate(zs)]


def compression(model: nn.Module, images: torch.Tensor, fractions: Optional[Sequence[float]] = None,
                out_dir: PathLike = ".", tag: str = "model", temperature: float = 1.0,
                cond: Optional[torch.Tensor] = None, seed: int = 0, padding: int = 2) -> Figure:
    """`{tag}-compression.png`: one row per image (uint8 [k, C, H, W]), one column per kept fraction.

    `fractions` defaults to every fraction the model's scales allow, largest first; a fraction that does
    not fall on a scale boundary is an error. Fraction 1 keeps every latent, so its column is the image
    itself (`encode` decodes back exactly). `cond` [k, cond_dim] conditions both ways.
    Figure.images: uint8 [k, len(fractions), C, H, W].
    """
    zs = encode(model, images, cond)
    sizes = [z[0].numel() for z in zs]
    fractions = kept_fractions(sizes) if fractions is None else list(fractions)
    generator = generator_for(model, seed)
    columns = [decode(model, keep_coarsest(zs, _coarsest_count(sizes, f), temperature, generator), cond)
               for f in fractions]
    grid = torch.stack(columns, dim=1)
    path = save_png(image_grid(grid.flatten(0, 1), grid.shape[1], padding), figure_path(out_dir, tag, "compression.png"))
    return Figure(path, grid)
