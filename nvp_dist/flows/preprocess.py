"""Preprocessing and the objective: dequantisation, the logit transform and bits per dimension.

x = (k + u) / 256 with u ~ U[0, 1) turns 8-bit pixels k into a density problem (an upper bound on the
discrete model's bits/dim); y = logit(alpha + (1 - 2 alpha) x) with alpha = 0.05 maps it to the real line,
with per-element log|dy/dx| = log(1 - 2 alpha) + softplus(y) + softplus(-y).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def dequantize(k: torch.Tensor, noise: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B,C,H,W] -> x in [0, 1). `noise` (values in [0,1)) replaces the uniform draw when given."""
    if noise is None:
        noise = torch.rand(k.shape, generator=generator, device=k.device, dtype=dtype)
    return (k.to(dtype) + noise.to(dtype)) / 256.0


def to_logit(x: torch.Tensor, alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """x in [0,1) -> (y, per-example log|det dy/dx|)."""
    p = alpha + (1 - 2 * alpha) * x
    y = torch.log(p) - torch.log1p(-p)
    logdet = (math.log(1 - 2 * alpha) + F.softplus(y) + F.softplus(-y)).flatten(1).sum(1)
    return y, logdet


def from_logit(y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Logit-space y -> uint8 pixels: the inverse of to_logit followed by floor(256 x)."""
    x = (torch.sigmoid(y.float()) - alpha) / (1 - 2 * alpha)
    return torch.floor(x * 256).clamp(0, 255).to(torch.uint8)


def bits_per_dim(model, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-example bits/dim [B] of uint8 images x under `model` (a RealNVP) with uniform dequantisation.

    bpd = [-log N(f(y)) - log|det df/dy| - log|det dy/dx| + D ln 256] / (D ln 2), D = C*H*W.
    Computed in float32 (float64 if the model is float64), whatever dtype the s/t networks use.
    """
    dtype = torch.float64 if _param_dtype(model) == torch.float64 else torch.float32
    y, logdet_pre = to_logit(dequantize(x, noise, generator, dtype), model.cfg.alpha)
    zs, logdet = model(y, cond)
    return bits_from_latents(zs, logdet, logdet_pre, x[0].numel())


def bits_from_latents(zs, logdet: torch.Tensor, logdet_pre: torch.Tensor, d: int) -> torch.Tensor:
    """Per-example bits/dim from the flow's outputs and the preprocessing log-det (D = d dimensions)."""
    from nvp_dist.flows.realnvp import log_standard_normal  # realnvp imports this module

    nll = -(log_standard_normal(zs) + logdet.to(logdet_pre.dtype) + logdet_pre) + d * math.log(256)
    return nll / (d * math.log(2))


def _param_dtype(model) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32
