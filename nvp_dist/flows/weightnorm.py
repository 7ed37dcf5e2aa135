"""Weight-normalised convolution (Salimans & Kingma 2016), as the paper's s/t networks use.

Written as one module owning both parameters rather than torch's parametrization: DeepSpeed ZeRO-3 gathers
a module's own parameters around its forward, and a parametrization keeps them in a child module that is
never called. `g` (the magnitude) is what the paper's L2 penalty regularises.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WNConv2d(nn.Module):
    """weight = g * v / ||v||, the norm taken per output channel."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, bias: bool = True, zero_init: bool = False):
        super().__init__()
        self.padding = kernel_size // 2
        v = torch.empty(out_ch, in_ch, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.v = nn.Parameter(v)
        # g = ||v|| makes the initial weight equal to v; g = 0 makes the layer output its bias (zero).
        g = torch.zeros(out_ch) if zero_init else v.flatten(1).norm(dim=1)
        self.g = nn.Parameter(g)
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None

    def weight(self) -> torch.Tensor:
        norm = self.v.flatten(1).norm(dim=1).clamp_min(1e-12)
        return self.v * (self.g / norm).view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, padding=self.padding)
