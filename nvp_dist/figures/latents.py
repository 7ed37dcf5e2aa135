"""Moving images in and out of a RealNVP's latent space for the figures, in evaluation mode.

Every figure encodes with the running batch-norm statistics (what `RealNVP.decode` uses), so an image's
latents do not depend on the other images drawn beside it and decoding them gives the image back.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn

from nvp_dist.flows import dequantize, to_logit


def model_device(model: nn.Module) -> torch.device:
    return next(model.buffers()).device


def generator_for(model: nn.Module, seed: int) -> torch.Generator:
    """A seeded generator on the model's device (torch.randn refuses a CPU generator for CUDA tensors)."""
    return torch.Generator(device=model_device(model)).manual_seed(seed)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor, cond: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """uint8 images [B, C, H, W] -> the model's per-scale latents (finest first), float32.

    Dequantisation noise 0.5 puts every pixel at the centre of its bin: `from_logit` floors, so a round
    trip lands back on the same integer unless its error exceeds half a bin, far above float32 error.
    """
    device = model_device(model)
    images = images.to(device)
    x = dequantize(images, noise=torch.full(images.shape, 0.5, device=device))
    y, _ = to_logit(x, model.cfg.alpha)
    with eval_mode(model):
        zs, _ = model(y, None if cond is None else cond.to(device))
    return zs


@torch.no_grad()
def decode(model: nn.Module, zs: Sequence[torch.Tensor], cond: Optional[torch.Tensor] = None,
           batch_size: int = 64) -> torch.Tensor:
    """Latents -> uint8 images on the CPU, `batch_size` at a time (a 10x extrapolation or a manifold
    animation decodes far more pixels than one batch of training images)."""
    device = model_device(model)
    out = []
    for start in range(0, zs[0].shape[0], batch_size):
        part = [z[start:start + batch_size].to(device) for z in zs]
        part_cond = None if cond is None else cond[start:start + batch_size].to(device)
        out.append(model.decode(part, part_cond).cpu())
    return torch.cat(out)


def gaussian_latents(model: nn.Module, n: int, size: int, temperature: float,
                     generator: torch.Generator) -> List[torch.Tensor]:
    """n latents z ~ N(0, T^2 I) for size x size images: the shapes follow the size (the model is
    convolutional), which is what lets it draw images larger than it was trained on."""
    device = model_device(model)
    return [temperature * torch.randn((n, *shape), generator=generator, device=device)
            for shape in model.latent_shapes(size, size)]
