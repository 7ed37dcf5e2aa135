"""The s/t network of a coupling: a ResNet with batch norm, ReLU, weight norm and skip connections.

Layout (the official code's, see PAPER_NOTES): batch norm on the input, a 3x3 input convolution, residual
blocks (BN, ReLU, 3x3 conv, BN, ReLU, 3x3 conv) whose outputs are also summed through 1x1 skip
convolutions, then BN, ReLU and a 1x1 output convolution. The output layer starts at zero (magnitude
g = 0), so a fresh coupling outputs s = t = 0 and is the identity; the official code instead relies on
its tanh scale starting at 0, which leaves t nonzero. (A checkerboard coupling, whose tanh scale starts
at 0, gives raw_s back its magnitude: see AffineCoupling.)
An optional conditioning vector is projected to the feature maps and added after the input convolution.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nvp_dist.flows.batchnorm import StatBatchNorm2d
from nvp_dist.flows.weightnorm import WNConv2d


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        # Dropout before the second convolution (as Flow++ places it) is an option, not the paper's: it
        # regularises the s/t networks on small data sets. It acts in training mode only, so evaluation,
        # sampling and inversion stay deterministic and exact.
        self.net = nn.Sequential(
            StatBatchNorm2d(channels), nn.ReLU(), WNConv2d(channels, channels, 3, bias=False),
            StatBatchNorm2d(channels), nn.ReLU(), *([nn.Dropout(dropout)] if dropout > 0 else []),
            WNConv2d(channels, channels, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class STNetwork(nn.Module):
    """Maps [B, in_ch, H, W] (and cond [B, cond_dim]) to (raw_s, t), each [B, out_ch, H, W]."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, blocks: int, cond_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.in_norm = StatBatchNorm2d(in_ch)
        self.in_conv = WNConv2d(in_ch, mid_ch, 3)
        self.in_skip = WNConv2d(mid_ch, mid_ch, 1)
        self.cond_proj = nn.Linear(cond_dim, mid_ch) if cond_dim > 0 else None
        self.blocks = nn.ModuleList(ResidualBlock(mid_ch, dropout) for _ in range(blocks))
        self.skips = nn.ModuleList(WNConv2d(mid_ch, mid_ch, 1) for _ in range(blocks))
        self.out = nn.Sequential(StatBatchNorm2d(mid_ch), nn.ReLU(), WNConv2d(mid_ch, 2 * out_ch, 1, zero_init=True))

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None):
        h = self.in_conv(self.in_norm(x))
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("this model was built with cond_dim > 0 and needs a conditioning vector")
            h = h + self.cond_proj(cond.to(h.dtype))[:, :, None, None]
        skip = self.in_skip(h)
        for block, skip_conv in zip(self.blocks, self.skips):
            h = block(h)
            skip = skip + skip_conv(h)
        raw_s, t = self.out(skip).chunk(2, dim=1)
        return raw_s, t
