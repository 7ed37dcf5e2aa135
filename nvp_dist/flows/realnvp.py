"""The multiscale Real NVP (the paper's section 3.6).

Every scale but the last: 3 checkerboard couplings (alternating parity), squeeze, 3 channel-wise couplings
(alternating halves), then half of the variables are factored out as that scale's latent. The last scale:
4 checkerboard couplings. Each coupling is followed by batch normalisation of its changed elements (a flow
layer) unless `coupling_bn` is off. The s/t networks' feature maps double at every scale, and channel-wise
couplings use twice the feature maps of the checkerboard ones at the same scale (the official code).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from nvp_dist.flows.batchnorm import FlowBatchNorm
from nvp_dist.flows.config import ModelConfig
from nvp_dist.flows.coupling import AffineCoupling
from nvp_dist.flows.preprocess import from_logit
from nvp_dist.flows.squeeze import squeeze, squeeze_ordered, unsqueeze, unsqueeze_ordered


class CouplingBlock(nn.Module):
    """A coupling and the batch norm of its output: the unit that checkpointing and invertible backprop wrap."""

    def __init__(self, coupling: AffineCoupling, cfg: ModelConfig):
        super().__init__()
        self.coupling = coupling
        self.norm = FlowBatchNorm(coupling.channels, coupling.mask, cfg.bn_momentum, cfg.bn_eps) if cfg.coupling_bn else None

    def forward(self, x, cond=None):
        y, logdet = self.coupling(x, cond)
        if self.norm is not None:
            y, ld = self.norm(y)
            logdet = logdet + ld
        return y, logdet

    def inverse(self, y, cond=None):
        if self.norm is not None:
            y = self.norm.inverse(y)
        return self.coupling.inverse(y, cond)


def _blocks(kind: str, n: int, channels: int, mid: int, cfg: ModelConfig) -> nn.ModuleList:
    return nn.ModuleList(
        CouplingBlock(AffineCoupling(kind, i % 2, channels, mid, cfg.res_blocks, cfg.coupling_form,
                                     cfg.mask_input, cfg.cond_dim, cfg.dropout, cfg.checkerboard), cfg)
        for i in range(n))


class Scale(nn.Module):
    """One scale. forward(h) -> (h_next, z, logdet); the last scale returns (None, h, logdet)."""

    def __init__(self, channels: int, mid: int, last: bool, cfg: ModelConfig):
        super().__init__()
        self.last = last
        self.checker = _blocks("checkerboard", 4 if last else 3, channels, mid, cfg)
        self.channel = nn.ModuleList() if last else _blocks("channel", 3, 4 * channels, 2 * mid, cfg)

    def forward(self, h: torch.Tensor, cond=None):
        logdet = h.new_zeros(h.shape[0])
        for block in self.checker:
            h, ld = block(h, cond)
            logdet = logdet + ld
        if self.last:
            return None, h, logdet
        h = squeeze(h)
        for block in self.channel:
            h, ld = block(h, cond)
            logdet = logdet + ld
        h_next, z = squeeze_ordered(unsqueeze(h)).chunk(2, dim=1)
        return h_next, z, logdet

    def inverse(self, h_next: Optional[torch.Tensor], z: torch.Tensor, cond=None) -> torch.Tensor:
        if self.last:
            h = z
        else:
            h = squeeze(unsqueeze_ordered(torch.cat([h_next, z], dim=1)))
            for block in reversed(self.channel):
                h = block.inverse(h, cond)
            h = unsqueeze(h)
        for block in reversed(self.checker):
            h = block.inverse(h, cond)
        return h


class RealNVP(nn.Module):
    """model(y) -> (zs, logdet): y the logit-space image [B,C,H,W], zs one latent per scale (finest first),
    logdet [B] in the dtype of y. model.inverse(zs) -> y. model.sample(n) -> uint8 images."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        scales = []
        for i in range(cfg.num_scales):
            scales.append(Scale(cfg.in_channels * 2 ** i, cfg.mid_channels * 2 ** i, i == cfg.num_scales - 1, cfg))
        self.scales = nn.ModuleList(scales)

    def forward(self, y: torch.Tensor, cond: Optional[torch.Tensor] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
        self._check_input(y, cond)
        zs, logdet, h = [], y.new_zeros(y.shape[0]), y
        for scale in self.scales:
            h, z, ld = scale(h, cond)
            zs.append(z)
            logdet = logdet + ld
        return zs, logdet

    def inverse(self, zs: Sequence[torch.Tensor], cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = None
        for scale, z in zip(reversed(self.scales), reversed(list(zs))):
            h = scale.inverse(h, z, cond)
        return h

    def latent_shapes(self, h: int, w: int) -> List[Tuple[int, int, int]]:
        """Per-scale latent shapes for an h x w input (any size the scales divide: the model is convolutional)."""
        shapes, c = [], self.cfg.in_channels
        for i in range(self.cfg.num_scales - 1):
            shapes.append((2 * c, h // 2, w // 2))
            c, h, w = 2 * c, h // 2, w // 2
        shapes.append((c, h, w))
        return shapes

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, cond: Optional[torch.Tensor] = None,
               size: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n images as uint8 [n, C, size, size], z ~ N(0, temperature^2 I), with evaluation statistics."""
        size = size or self.cfg.image_size
        device = next(self.buffers()).device
        zs = [temperature * torch.randn((n, *s), generator=generator, device=device)
              for s in self.latent_shapes(size, size)]
        return self.decode(zs, cond)

    @torch.no_grad()
    def decode(self, zs: Sequence[torch.Tensor], cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Latents -> uint8 images, in evaluation mode (running batch-norm statistics)."""
        was_training = self.training
        self.eval()
        try:
            y = self.inverse([z.float() for z in zs], cond)
        finally:
            self.train(was_training)
        return from_logit(y, self.cfg.alpha)

    def l2_parameters(self) -> List[nn.Parameter]:
        """The parameters the paper's L2 penalty applies to: weight-norm magnitudes and tanh scales."""
        return [p for name, p in self.named_parameters() if name.endswith(".g") or name.endswith(".scale")]

    def _check_input(self, y: torch.Tensor, cond: Optional[torch.Tensor]) -> None:
        c, k = self.cfg.in_channels, 2 ** (self.cfg.num_scales - 1)
        if y.dim() != 4 or y.shape[1] != c or y.shape[2] % k or y.shape[3] % k:
            raise ValueError(f"RealNVP expects [B, {c}, H, W] with H, W divisible by {k}; got {tuple(y.shape)}")
        if self.cfg.cond_dim and (cond is None or cond.shape != (y.shape[0], self.cfg.cond_dim)):
            raise ValueError(f"this model needs cond of shape [B, {self.cfg.cond_dim}]")


def log_standard_normal(zs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over all latent elements of log N(z; 0, 1), per example, in float32 or wider."""
    total = 0.0
    for z in zs:
        z = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
        total = total + (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    return total
