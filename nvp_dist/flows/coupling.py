"""Affine coupling layers with checkerboard and channel-wise masks (the paper's section 3.3-3.4).

A mask b is 1 on the elements a coupling keeps. With s = c * tanh(raw_s) and (raw_s, t) = NN(b * x):
  paper form    y = b * x + (1 - b) * (x * exp(s) + t)
  official form y = b * x + (1 - b) * ((x + t) * exp(s))
and log|det dy/dx| = sum of s over the changed elements. The s/t network may run in bf16; the coupling
arithmetic and its log-determinant run in the dtype of x (float32 or float64), never lower.

Checkerboard couplings come masked (the paper: NN sees b * x at full resolution) or gathered (an option:
each colour of the checkerboard packed row by row into an H x W/2 image, NN sees the kept colour only).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from nvp_dist.flows.config import Checkerboard, CouplingForm
from nvp_dist.flows.resnet import STNetwork


@functools.lru_cache(maxsize=64)
def _checkerboard(h: int, w: int, parity: int) -> torch.Tensor:
    i = torch.arange(h).view(-1, 1)
    j = torch.arange(w).view(1, -1)
    return ((i + j + parity) % 2 == 0).float()


def checkerboard_mask(c: int, h: int, w: int, parity: int, device=None) -> torch.Tensor:
    """[1, C, H, W]: 1 where (row + col + parity) is even. Parity 0 keeps the top-left pixel."""
    return _checkerboard(h, w, parity).to(device).expand(1, c, h, w)


def channel_mask(c: int, h: int, w: int, half: int, device=None) -> torch.Tensor:
    """[1, C, H, W]: 1 on the first half of the channels (half=0) or on the second half (half=1)."""
    keep = torch.zeros(c, device=device)
    if half == 0:
        keep[: c // 2] = 1
    else:
        keep[c // 2:] = 1
    return keep.view(1, c, 1, 1).expand(1, c, h, w)


def _kept_first(h: int, parity: int) -> torch.Tensor:
    # [H, 1] bool: in row i the kept pixel of each column pair (2k, 2k+1) is the first one exactly when the
    # mask keeps column 0 of that row, so the packing follows the mask's own definition.
    return _checkerboard(h, 1, parity).bool()


def gather_checkerboard(x: torch.Tensor, parity: int):
    """[N, C, H, W] -> (kept, changed), each [N, C, H, W/2]: the two colours of checkerboard_mask(parity)."""
    if x.shape[3] % 2:
        raise ValueError(f"a gathered checkerboard coupling needs an even width, got {tuple(x.shape)}")
    first = _kept_first(x.shape[2], parity).to(x.device)
    a, b = x.unflatten(3, (x.shape[3] // 2, 2)).unbind(-1)
    return torch.where(first, a, b), torch.where(first, b, a)


def scatter_checkerboard(kept: torch.Tensor, changed: torch.Tensor, parity: int) -> torch.Tensor:
    """The inverse of gather_checkerboard."""
    first = _kept_first(kept.shape[2], parity).to(kept.device)
    return torch.stack((torch.where(first, kept, changed), torch.where(first, changed, kept)), dim=-1).flatten(3)


class AffineCoupling(nn.Module):
    def __init__(self, kind: str, parity: int, channels: int, mid_channels: int, blocks: int,
                 form: CouplingForm = CouplingForm.paper, mask_input: bool = True, cond_dim: int = 0,
                 dropout: float = 0.0, checkerboard: Checkerboard = Checkerboard.masked):
        super().__init__()
        if kind not in ("checkerboard", "channel"):
            raise ValueError(f"unknown coupling kind {kind!r}")
        self.kind, self.parity, self.channels = kind, parity, channels
        self.form = CouplingForm(form)
        self.gathered = kind == "checkerboard" and Checkerboard(checkerboard) is Checkerboard.gathered
        # Masked: the mask itself is the extra channel. Gathered: which column of its pair each kept pixel
        # came from (the row's parity), the one piece of geometry the packing hides.
        self.mask_input = mask_input and kind == "checkerboard"
        if kind == "checkerboard":
            net_in, net_out = channels + int(self.mask_input), channels
        else:
            net_in, net_out = channels // 2, channels - channels // 2
        self.net = STNetwork(net_in, mid_channels, net_out, blocks, cond_dim, dropout)
        # One learned scalar bounding s (the official code's init: 0 checkerboard, 1 channel-wise); shape [1]
        # rather than [] because DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes.
        self.scale = nn.Parameter(torch.full((1,), 0.0 if kind == "checkerboard" else 1.0))
        if kind == "checkerboard":
            # With c = 0 and a zero raw_s layer, ds/dc = tanh(raw_s) = 0 and ds/draw_s = c = 0: neither
            # would ever move and s would stay 0 (an additive coupling) for good. raw_s's half of the output
            # layer keeps its ordinary magnitude instead; s = 0 * tanh(raw_s) = 0 still makes the coupling
            # start as the identity, and c now learns from the first step.
            out = self.net.out[-1]
            with torch.no_grad():
                out.g[:net_out] = out.v[:net_out].flatten(1).norm(dim=1)

    def mask(self, h: int, w: int, device=None) -> torch.Tensor:
        fn = checkerboard_mask if self.kind == "checkerboard" else channel_mask
        return fn(self.channels, h, w, self.parity, device)

    def _split(self, x: torch.Tensor):
        """(kept, changed) for channel-wise and gathered couplings."""
        if self.gathered:
            return gather_checkerboard(x, self.parity)
        half = self.channels // 2
        a, b = x[:, :half], x[:, half:]
        return (a, b) if self.parity == 0 else (b, a)

    def _join(self, keep: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        if self.gathered:
            return scatter_checkerboard(keep, change, self.parity)
        return torch.cat((keep, change) if self.parity == 0 else (change, keep), dim=1)

    def _net_input(self, keep: torch.Tensor) -> torch.Tensor:
        if not (self.gathered and self.mask_input):
            return keep
        first = _kept_first(keep.shape[2], self.parity).to(keep.device, keep.dtype)
        return torch.cat([keep, first.expand(keep.shape[0], 1, -1, keep.shape[3])], dim=1)

    def _s_t(self, net_in: torch.Tensor, cond: Optional[torch.Tensor], dtype: torch.dtype):
        net_dtype = self.net.in_conv.v.dtype
        raw_s, t = self.net(net_in.to(net_dtype), cond)
        # Back to the flow's dtype before tanh/exp: the bound and the log-det stay in float32 or wider.
        s = self.scale.to(dtype) * torch.tanh(raw_s.to(dtype))
        return s, t.to(dtype)

    def _checker_s_t(self, x: torch.Tensor, cond):
        b = self.mask(x.shape[2], x.shape[3], x.device).to(x.dtype)
        net_in = x * b
        if self.mask_input:
            net_in = torch.cat([net_in, b[:, :1].expand(x.shape[0], 1, -1, -1)], dim=1)
        s, t = self._s_t(net_in, cond, x.dtype)
        return b, s * (1 - b), t * (1 - b)

    def _affine(self, x, s, t):
        return x * torch.exp(s) + t if self.form is CouplingForm.paper else (x + t) * torch.exp(s)

    def _affine_inverse(self, y, s, t):
        return (y - t) * torch.exp(-s) if self.form is CouplingForm.paper else y * torch.exp(-s) - t

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None):
        if self.kind == "checkerboard" and not self.gathered:
            _, s, t = self._checker_s_t(x, cond)  # s = t = 0 on the kept half
            return self._affine(x, s, t), s.flatten(1).sum(1)
        keep, change = self._split(x)
        s, t = self._s_t(self._net_input(keep), cond, x.dtype)
        return self._join(keep, self._affine(change, s, t)), s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor, cond: Optional[torch.Tensor] = None):
        if self.kind == "checkerboard" and not self.gathered:
            _, s, t = self._checker_s_t(y, cond)  # y * b == x * b: the kept half is unchanged
            return self._affine_inverse(y, s, t)
        keep, change = self._split(y)
        s, t = self._s_t(self._net_input(keep), cond, y.dtype)
        return self._join(keep, self._affine_inverse(change, s, t))
