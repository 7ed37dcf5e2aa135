"""Batch normalisation: as an invertible flow layer on coupling outputs, and inside the s/t networks.

Both compute batch moments through `batch_moments`, which calls an optional `stats_reducer` so that the
training code can synchronise statistics across ranks (a flow's likelihood depends on them) without the
model knowing about ranks: see `set_stats_reducer`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

# reducer(tensor) -> the tensor summed over all ranks, differentiably.
StatsReducer = Callable[[torch.Tensor], torch.Tensor]


def batch_moments(x: torch.Tensor, weight: torch.Tensor, reducer: Optional[StatsReducer]):
    """Per-channel mean and biased variance of x [B,C,H,W] over the positions where weight [1,C,H,W] is 1.

    Returns (mean, var, count) each of shape [C]; count is the number of elements per channel over the
    whole (possibly distributed) batch. Two passes (mean, then centred squares) for float32 accuracy.
    """
    b = x.shape[0]
    count = weight.sum(dim=(0, 2, 3)) * b
    sums = (x * weight).sum(dim=(0, 2, 3))
    if reducer is not None:
        count = reducer(count.detach())
        sums = reducer(sums)
    mean = sums / count.clamp_min(1)
    sq = (((x - mean.view(1, -1, 1, 1)) * weight) ** 2).sum(dim=(0, 2, 3))
    if reducer is not None:
        sq = reducer(sq)
    return mean, sq / count.clamp_min(1), count


class FlowBatchNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) on the transformed part of a coupling's output.

    log|det| per example = -1/2 sum over the normalised elements of log(var + eps), with the statistics
    treated as constants (the paper's convention). Training mode uses batch statistics (kept as `last_mean`
    and `last_var` so `inverse` can undo the latest forward); evaluation mode uses running averages. The
    layer has no affine parameters, as in the paper and the official code.
    `mask` is a function (H, W, device) -> [1,C,H,W] tensor that is 1 on the elements the coupling kept;
    those pass through untouched and do not enter the statistics.
    """

    def __init__(self, channels: int, mask: Callable, momentum: float, eps: float):
        super().__init__()
        self.mask = mask
        self.momentum = momentum
        self.eps = eps
        self.stats_reducer: Optional[StatsReducer] = None
        # Running statistics stay float32 even when the module is cast to bf16 (see nvp_dist.flows.precision).
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.last_mean: Optional[torch.Tensor] = None
        self.last_var: Optional[torch.Tensor] = None

    def _stats(self, x: torch.Tensor, keep: torch.Tensor):
        if not self.training:
            return self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        mean, var, count = batch_moments(x, 1 - keep, self.stats_reducer)
        with torch.no_grad():
            used = count > 0
            m = self.momentum
            self.running_mean[used] = ((1 - m) * self.running_mean + m * mean.to(self.running_mean.dtype))[used]
            self.running_var[used] = ((1 - m) * self.running_var + m * var.to(self.running_var.dtype))[used]
        self.last_mean, self.last_var = mean.detach(), var.detach()
        return mean, var

    def forward(self, x: torch.Tensor, cond=None):
        keep = self.mask(x.shape[2], x.shape[3], x.device).to(x.dtype)
        mean, var = self._stats(x, keep)
        return self.normalize(x, keep, mean, var)

    def normalize(self, x, keep, mean, var):
        """The layer's map for given statistics (what the Jacobian tests differentiate)."""
        change = 1 - keep
        log_scale = -0.5 * torch.log(var + self.eps)
        y = x * keep + change * (x - mean.view(1, -1, 1, 1)) * torch.exp(log_scale).view(1, -1, 1, 1)
        per_channel = change[0].sum(dim=(1, 2))  # normalised elements per channel of one example
        logdet = (per_channel * log_scale).sum().expand(x.shape[0])
        return y, logdet

    def inverse(self, y: torch.Tensor, cond=None):
        keep = self.mask(y.shape[2], y.shape[3], y.device).to(y.dtype)
        if self.training and self.last_mean is not None:
            mean, var = self.last_mean.to(y.dtype), self.last_var.to(y.dtype)
        else:
            mean, var = self.running_mean.to(y.dtype), self.running_var.to(y.dtype)
        std = torch.sqrt(var + self.eps).view(1, -1, 1, 1)
        return y * keep + (1 - keep) * (y * std + mean.view(1, -1, 1, 1))


class StatBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics go through `batch_moments` (and so its reducer)."""

    stats_reducer: Optional[StatsReducer] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.stats_reducer is None:
            return super().forward(x)
        ones = torch.ones(1, x.shape[1], 1, 1, dtype=x.dtype, device=x.device)
        ones = ones.expand(1, -1, x.shape[2], x.shape[3])
        mean, var, count = batch_moments(x, ones, self.stats_reducer)
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked += 1
        y = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def set_stats_reducer(model: nn.Module, reducer: Optional[StatsReducer]) -> None:
    """Route every batch-norm layer's training statistics through `reducer` (None: this batch only)."""
    for m in model.modules():
        if isinstance(m, (FlowBatchNorm, StatBatchNorm2d)):
            m.stats_reducer = reducer
