"""Squeeze operations: volume-preserving permutations between (C, H, W) and (4C, H/2, W/2).

`squeeze` is the official code's squeeze_2x2 (channel index c*4 + 2i + j for sub-pixel (i, j)), used
before the channel-wise couplings. `squeeze_ordered` puts the two diagonal sub-pixels (0,0), (1,1) of
every colour first and the anti-diagonal ones (0,1), (1,0) last (channel index k*C + c), so factoring out
the second half keeps a checkerboard half of the pixels at the next scale, as the official code does.
"""
import torch

# Sub-pixel order of squeeze_ordered: diagonal first, then anti-diagonal (the official SQUEEZE_MATRIX).
_ORDER = ((0, 0), (1, 1), (0, 1), (1, 0))


def squeeze(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = x.shape
    x = x.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def squeeze_ordered(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:, :, i::2, j::2] for i, j in _ORDER], dim=1)


def unsqueeze_ordered(x: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = x.shape
    c = c4 // 4
    out = x.new_empty(b, c, h * 2, w * 2)
    for k, (i, j) in enumerate(_ORDER):
        out[:, :, i::2, j::2] = x[:, k * c:(k + 1) * c]
    return out
