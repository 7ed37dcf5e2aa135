"""Which evaluation images a figure shows: positions in the split's evaluation order (the order `nvp-dist
eval` reads it in, centre crops, bad samples skipped), chosen by the user or drawn at random from a seed.

A seeded random choice rather than the first images: the first images of a split are often all of one class
or one shard's subject, and a figure drawn from them says little about the model on the rest.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def default_indices(split_size: int, n: int, seed: int) -> List[int]:
    """n distinct positions in [0, split_size), drawn from `seed` alone (the same on every machine)."""
    if n > split_size:
        raise ValueError(f"the split has only {split_size} images; {n} needed")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(split_size, generator=g)[:n].tolist()


def _read(cfg, split: str, indices: Sequence[int]):
    """({position: image}, {position: cond}, valid images read): reading stops past the largest position."""
    from nvp_dist.data import eval_batches

    wanted, last = set(indices), max(indices)
    found, conds, seen = {}, {}, 0
    for batch in eval_batches(cfg.data, split, batch_size=64):
        images = batch.images[batch.valid]
        cond = batch.cond[batch.valid] if batch.cond is not None else None
        for i in range(len(images)):
            if seen + i in wanted:
                found[seen + i] = images[i]
                if cond is not None:
                    conds[seen + i] = cond[i]
        seen += len(images)
        if seen > last:
            break
    return found, conds, seen


def eval_images(cfg, split: str, indices: Sequence[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The images (uint8 [n, C, H, W]) and conditioning (or None) at these positions of `split`, in the
    order given; reading stops at the largest position."""
    if not indices or min(indices) < 0:
        raise ValueError(f"indices must be non-negative positions in the split; got {list(indices)}")
    found, conds, seen = _read(cfg, split, indices)
    if seen <= max(indices):
        raise ValueError(f"split {split!r} has only {seen} images; index {max(indices)} asked for")
    return _stack(found, conds, indices)


def _stack(found, conds, indices):
    x = torch.stack([found[i] for i in indices])
    return x, (torch.stack([conds[i] for i in indices]) if conds else None)


def choose_images(cfg, split: str, n: int, indices: Optional[Sequence[int]], seed: int):
    """(indices, images, cond): the given `indices` (exactly n of them), else n drawn from `seed`.

    The manifest counts bad samples too, which evaluation skips: when a draw over that count lands past
    the valid images, it is drawn again over the valid count that reading found (same seed, same result
    on every machine)."""
    from nvp_dist.data import read_manifest

    if indices is not None:
        if len(indices) != n:
            raise ValueError(f"this figure shows {n} images; --indices gave {len(indices)}")
        images, cond = eval_images(cfg, split, indices)
        return list(indices), images, cond
    indices = default_indices(read_manifest(cfg.data.path).num_samples(split), n, seed)
    found, conds, seen = _read(cfg, split, indices)
    if seen <= max(indices):
        indices = default_indices(seen, n, seed)
        found, conds, seen = _read(cfg, split, indices)
    return list(indices), *_stack(found, conds, indices)
