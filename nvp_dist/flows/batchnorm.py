"""Batch normalisation: as an invertible flow layer on coupling outputs, and inside the s/t networks.

Both compute batch moments through `batch_moments`, which calls an optional `stats_reducer` so that the
training code can synchronise statistics across ranks (a flow's likelihood depends on them) without the
model knowing about ranks: see `set_stats_reducer`.
"""
from __future__ import annotations

import contextlib

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# reducer(tensor) -> the tensor summed over all ranks, differentiably.
StatsReducer = Callable[[torch.Tensor], torch.Tensor]


def batch_moments(x: torch.Tensor, weight: torch.Tensor, reducer: Optional[StatsReducer],
                  shift: Optional[torch.Tensor] = None):
    """Per-channel mean and biased variance of x [B,C,H,W] over the positions where weight [1,C,H,W] is 1.

    Returns (mean, var, count) each of shape [C]; count is the number of elements per channel over the
    whole (possibly distributed) batch. Without a reducer: two passes (mean, then centred squares). With
    one: a single reduction of (count, sum, sum of squares) taken about `shift` (the running mean, close to
    the batch mean), so that one collective per layer suffices and float32 does not cancel badly.
    """
    b = x.shape[0]
    if reducer is None:
        count = weight.sum(dim=(0, 2, 3)) * b
        mean = (x * weight).sum(dim=(0, 2, 3)) / count.clamp_min(1)
        var = (((x - mean.view(1, -1, 1, 1)) * weight) ** 2).sum(dim=(0, 2, 3)) / count.clamp_min(1)
        return mean, var, count
    k = (shift if shift is not None else torch.zeros(x.shape[1], device=x.device)).detach().to(x.dtype)
    d = (x - k.view(1, -1, 1, 1)) * weight
    count = (weight.sum(dim=(0, 2, 3)) * b).to(x.dtype)
    total = reducer(torch.stack([count, d.sum(dim=(0, 2, 3)), (d * d).sum(dim=(0, 2, 3))]))
    count = total[0].detach()
    m1 = total[1] / count.clamp_min(1)
    var = (total[2] / count.clamp_min(1) - m1 * m1).clamp_min(0)
    return k + m1, var, count


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
        self.update_running = True
        # Running statistics stay float32 even when the module is cast to bf16 (nvp_dist.train.engine restores them after DeepSpeed's cast).
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.last_mean: Optional[torch.Tensor] = None
        self.last_var: Optional[torch.Tensor] = None

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, used: torch.Tensor) -> None:
        m = self.momentum
        self.running_mean[used] = ((1 - m) * self.running_mean + m * mean.to(self.running_mean.dtype))[used]
        self.running_var[used] = ((1 - m) * self.running_var + m * var.to(self.running_var.dtype))[used]

    def _stats(self, x: torch.Tensor, keep: torch.Tensor):
        if not self.training:
            return self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        mean, var, count = batch_moments(x, 1 - keep, self.stats_reducer, self.running_mean)
        if self.update_running:
            self._update_running(mean, var, count > 0)
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
    """nn.BatchNorm2d computed in float32 (or float64) whatever the input dtype (bf16 s/t networks keep float32
    statistics), with training statistics through `batch_moments` (and so its reducer) when one is set."""

    stats_reducer: Optional[StatsReducer] = None
    update_running = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf, w, b = x.to(wide), self.weight.to(wide), self.bias.to(wide)
        if not self.training or self.stats_reducer is None:
            track = not self.training or self.update_running
            y = F.batch_norm(xf, self.running_mean if track else None, self.running_var if track else None,
                             w, b, self.training, self.momentum, self.eps)
            return y.to(x.dtype)
        ones = torch.ones(1, x.shape[1], 1, 1, dtype=xf.dtype, device=x.device).expand(1, -1, x.shape[2], x.shape[3])
        mean, var, count = batch_moments(xf, ones, self.stats_reducer, self.running_mean)
        if self.update_running:
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked += 1
        y = (xf - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        return (y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)).to(x.dtype)


def set_stats_reducer(model: nn.Module, reducer: Optional[StatsReducer]) -> None:
    """Route every batch-norm layer's training statistics through `reducer` (None: this batch only)."""
    for m in model.modules():
        if isinstance(m, (FlowBatchNorm, StatBatchNorm2d)):
            m.stats_reducer = reducer


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module):
    """Batch statistics as usual, running averages untouched: for a forward that repeats one already
    counted (activation-checkpoint recomputation, the invertible backward)."""
    layers = [m for m in model.modules() if isinstance(m, (FlowBatchNorm, StatBatchNorm2d))]
    saved = [m.update_running for m in layers]
    for m in layers:
        m.update_running = False
    try:
        yield
    finally:
        for m, u in zip(layers, saved):
            m.update_running = u
