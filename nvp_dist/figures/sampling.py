"""Samples x = g(z), z ~ N(0, T^2 I): at the training size beside data (the paper's Figure 5 and 7-11) and
at multiples of it (extrapolation, Figures 17-21)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from nvp_dist.figures.grids import Figure, PathLike, figure_path, image_grid, save_png, side_by_side
from nvp_dist.figures.latents import decode, gaussian_latents, generator_for


def _draw(model: nn.Module, n: int, size: int, temperature: float, cond: Optional[torch.Tensor],
          seed: int, batch_size: int) -> torch.Tensor:
    zs = gaussian_latents(model, n, size, temperature, generator_for(model, seed))
    return decode(model, zs, cond, batch_size)


def samples(model: nn.Module, data_images: torch.Tensor, n: int = 8, temperatures: Sequence[float] = (1.0,),
            out_dir: PathLike = ".", tag: str = "model", cond: Optional[torch.Tensor] = None, seed: int = 0,
            batch_size: int = 64, padding: int = 2) -> List[Figure]:
    """One PNG per temperature, `{tag}-samples-T{T}.png`: an n x n grid of the first n*n data images
    (uint8 [N, C, H, W]) on the left, an n x n grid of samples on the right, as in the paper's Figure 5.

    Every temperature reuses the same seed, so its grid shows the same z scaled by T: the figures differ
    only by temperature. `cond` [n*n, cond_dim] conditions the samples of a conditional model.
    Figure.images: the samples, uint8 [n, n, C, H, W].
    """
    if data_images.shape[0] < n * n:
        raise ValueError(f"need {n * n} data images for an {n} x {n} grid; got {data_images.shape[0]}")
    data_grid = image_grid(data_images[:n * n], n, padding)
    figures = []
    for t in temperatures:
        images = _draw(model, n * n, model.cfg.image_size, t, cond, seed, batch_size)
        grid = side_by_side(data_grid, image_grid(images, n, padding))
        path = save_png(grid, figure_path(out_dir, tag, f"samples-T{t:g}.png"))
        figures.append(Figure(path, images.view(n, n, *images.shape[1:])))
    return figures


def extrapolate(model: nn.Module, n: int = 2, factors: Sequence[int] = (2, 10), out_dir: PathLike = ".",
                tag: str = "model", temperatures: Sequence[float] = (1.0,), cond: Optional[torch.Tensor] = None,
                seed: int = 0, batch_size: int = 4, padding: int = 2) -> List[Figure]:
    """One PNG per factor and temperature, `{tag}-extrapolate-x{factor}-T{T}.png`: an n x n grid of samples
    of side factor * model.cfg.image_size (the paper's Figures 17-21; the latent shapes follow the size).
    As in `samples`, every temperature reuses the seed. `cond` [n*n, cond_dim] for a conditional model.

    `batch_size` bounds memory: a 10x sample holds 100 training images' worth of activations.
    Figure.images: uint8 [n, n, C, S, S] with S = factor * image_size.
    """
    figures = []
    for factor in factors:
        size = factor * model.cfg.image_size
        for t in temperatures:
            images = _draw(model, n * n, size, t, cond, seed, batch_size)
            name = f"extrapolate-x{factor}-T{t:g}.png"
            path = save_png(image_grid(images, n, padding), figure_path(out_dir, tag, name))
            figures.append(Figure(path, images.view(n, n, *images.shape[1:])))
    return figures
