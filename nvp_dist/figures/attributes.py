"""Changing attributes of real images (the paper's Figure 28): encode an image with its own attribute
vector, then decode the same latents with attributes switched, or with another image's whole attribute vector. For a class-conditional model (one-hot
conditioning, e.g. the digits) the switch is to another class: the latents keep the writing style.

The latents of a conditional flow hold what the attributes do not explain (pose, background, lighting), so
decoding them under another attribute vector keeps those and redraws the rest.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from nvp_dist.figures.grids import Figure, PathLike, figure_path, image_grid, save_png
from nvp_dist.figures.latents import decode, encode


def flip_attribute(cond: torch.Tensor, attr_names: Sequence[str], name: str) -> torch.Tensor:
    """cond [N, cond_dim] of 0/1 attributes with the column `name` switched (0 <-> 1)."""
    if name not in attr_names:
        raise ValueError(f"unknown attribute {name!r}; the model's attributes are {list(attr_names)}")
    flipped = cond.clone()
    j = list(attr_names).index(name)
    flipped[:, j] = 1 - flipped[:, j]
    return flipped


def set_class(cond: torch.Tensor, class_names: Sequence[str], name: str) -> torch.Tensor:
    """One-hot cond [N, n_classes] with every row set to the class `name`."""
    if name not in class_names:
        raise ValueError(f"unknown class {name!r}; the model's classes are {list(class_names)}")
    swapped = torch.zeros_like(cond)
    swapped[:, list(class_names).index(name)] = 1
    return swapped


def attributes(model: nn.Module, images: torch.Tensor, cond: torch.Tensor, attr_names: Sequence[str],
               flips: Sequence[str], out_dir: PathLike = ".", tag: str = "model", batch_size: int = 64,
               padding: int = 2, classes: bool = False, cond_from: Optional[torch.Tensor] = None) -> Figure:
    """`{tag}-attributes.png`: one row per uint8 image [N, C, H, W]; columns: the image, its reconstruction
    with its own attributes `cond` [N, cond_dim] (0/1, named by `attr_names` in order), then one column per
    name in `flips`, decoded with that single attribute switched; with `classes` (one-hot class conditioning,
    `attr_names` the class names) decoded as that class instead. With `cond_from` [cond_dim] (another
    image's attributes, the paper's Figure 28) a last column decodes every row's latents with that vector.
    Figure.images: uint8 [N, 2 + len(flips) (+ 1), C, H, W].
    """
    cond_dim = model.cfg.cond_dim
    if cond_dim == 0:
        raise ValueError("attributes needs a model built with cond_dim > 0")
    if len(attr_names) != cond_dim or cond.shape != (images.shape[0], cond_dim):
        raise ValueError(f"the model takes {cond_dim} attributes: need {cond_dim} names and cond of shape "
                         f"[{images.shape[0]}, {cond_dim}]; got {len(attr_names)} and {tuple(cond.shape)}")
    cond = cond.float()
    switch = set_class if classes else flip_attribute
    flipped = [switch(cond, attr_names, name) for name in flips]  # unknown names fail before any work
    if cond_from is not None:
        if cond_from.shape != (cond_dim,):
            raise ValueError(f"cond_from must be one attribute vector [{cond_dim}]; got {tuple(cond_from.shape)}")
        flipped.append(cond_from.float().to(cond.device).expand_as(cond))
    zs = encode(model, images, cond)
    columns = [images.cpu(), decode(model, zs, cond, batch_size)]
    columns += [decode(model, zs, c, batch_size) for c in flipped]
    grid = torch.stack(columns, dim=1)
    path = save_png(image_grid(grid.flatten(0, 1), grid.shape[1], padding), figure_path(out_dir, tag, "attributes.png"))
    return Figure(path, grid)
