"""Conceptual compression (the paper's Figures 22-26): keep an image's coarsest latents, resample the rest.

The multiscale model factors out half of the remaining variables at every scale but the last, so with L
scales the latents hold D/2, D/4, ..., D/2^(L-1), D/2^(L-1) of the D variables, finest first. Keeping the
j coarsest of them keeps 1/2^(L-j) of the variables: the fractions a model can show are 1, 1/2, ...,
1/2^(L-1) (the paper's 100% to 6.25% are a five-scale model's). Asked for the paper's fractions, a model
with fewer scales shows those it has, and the figure's note says which it left out and why.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from nvp_dist.figures.grids import Figure, PathLike, figure_path, image_grid, label_columns, save_png
from nvp_dist.figures.latents import decode, encode, generator_for


def kept_fractions(latent_sizes: Sequence[int]) -> List[float]:
    """Fraction of all latent variables held by the j coarsest latents, for j = all of them down to 1."""
    total = sum(latent_sizes)
    return [sum(latent_sizes[start:]) / total for start in range(len(latent_sizes))]


PAPER_FRACTIONS = (1.0, 0.5, 0.25, 0.125, 0.0625)  # the columns of the paper's Figures 22-26


def fraction_label(fraction: float) -> str:
    """1 -> "100%", 0.0625 -> "6.25%", as the paper labels its columns."""
    return f"{100 * fraction:g}%"


def split_fractions(latent_sizes: Sequence[int], fractions: Sequence[float]) -> Tuple[List[float], List[float]]:
    """(shown, missing): the fractions on this model's scale boundaries, and those that would be on the
    boundary of a model with more scales (1/2^k below its smallest). Any other fraction is an error."""
    available = kept_fractions(latent_sizes)
    shown, missing = [], []
    for f in fractions:
        if any(math.isclose(f, a, rel_tol=1e-9) for a in available):
            shown.append(f)
        elif 0 < f < available[-1] and math.log2(f).is_integer():
            missing.append(f)
        else:
            raise ValueError(f"keeping {f:g} of the latents needs a scale boundary there; "
                             f"this model's scales allow {[f'{a:g}' for a in available]}")
    return shown, missing


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
    """`{tag}-compression.png`: one row per image (uint8 [k, C, H, W]), one column per kept fraction, each
    column headed by its fraction ("100%", "50%", ...).

    `fractions` defaults to every fraction the model's scales allow, largest first. Fractions a deeper
    model would allow (1/2^k below this model's smallest) are left out and named in Figure.note; any other
    fraction off a scale boundary is an error. Fraction 1 keeps every latent, so its column is the image
    itself (`encode` decodes back exactly). `cond` [k, cond_dim] conditions both ways.
    Figure.images: uint8 [k, shown fractions, C, H, W].
    """
    zs = encode(model, images, cond)
    sizes = [z[0].numel() for z in zs]
    shown, missing = split_fractions(sizes, kept_fractions(sizes) if fractions is None else list(fractions))
    if not shown:
        raise ValueError(f"none of the fractions {list(fractions)} fits this model's {len(sizes)} scales")
    generator = generator_for(model, seed)
    columns = [decode(model, keep_coarsest(zs, _coarsest_count(sizes, f), temperature, generator), cond)
               for f in shown]
    grid = torch.stack(columns, dim=1)
    picture = label_columns(image_grid(grid.flatten(0, 1), grid.shape[1], padding), [fraction_label(f) for f in shown],
                            images.shape[-1], padding)
    note = ""
    if missing:
        note = (f"{', '.join(map(fraction_label, missing))} not shown: this model has {len(sizes)} scales, "
                f"so the smallest fraction it can keep is {fraction_label(kept_fractions(sizes)[-1])}")
    return Figure(save_png(picture, figure_path(out_dir, tag, "compression.png")), grid, note)
