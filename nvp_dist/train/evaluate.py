"""Exact bits/dim over a whole split across ranks (each image once), and sample grids.

Evaluation runs a plain single-device copy of the model holding whole float32 weights (the Polyak
averages when kept): it needs no DeepSpeed collectives in its forward pass, so ZeRO-3 and ranks that hold
different numbers of real images cannot hang it.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch

from nvp_dist.config import Config
from nvp_dist.data import eval_batches, read_manifest
from nvp_dist.flows import RealNVP, bits_per_dim
from nvp_dist.train.distributed import DistEnv, reduce_tensor

log = logging.getLogger("nvp_dist.train")


def noise_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator seeded by a tuple of ints: dequantisation noise that depends only on its position."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def sample_noise(keys, shape, seed: int) -> torch.Tensor:
    """Dequantisation noise drawn from each sample's own key: the evaluation of an image does not depend
    on the number of ranks, the batch it fell in or the order it was read in."""
    out = torch.empty((len(keys), *shape))
    for i, key in enumerate(keys):
        g = torch.Generator().manual_seed((zlib.crc32(key.encode()) << 20) ^ seed)
        out[i] = torch.rand(shape, generator=g)
    return out


@torch.no_grad()
def evaluate(model: RealNVP, cfg: Config, env: DistEnv, split: Optional[str] = None, max_batches: int = 0,
             stop: Callable[[], bool] = lambda: False, step: int = 0, progress: bool = False) -> dict:
    """Mean bits/dim over `split` (all ranks together) and the number of images it covers; with
    `interrupted` true (and no mean) when `stop()` turned true on some rank between its batches. `progress`
    draws a progress bar on rank 0 (a whole ImageNet validation split takes minutes on one device)."""
    split = split or cfg.data.eval_split
    micro = max(1, cfg.train.batch_size // (env.world_size * cfg.train.grad_accum))
    model.eval()
    t = cfg.train
    total = torch.zeros(3, dtype=torch.float64, device=env.device)  # bits sum, images, ranks interrupted
    batches = eval_batches(cfg.data, split, batch_size=micro, rank=env.rank, world_size=env.world_size)
    if progress and env.is_main:
        from tqdm import tqdm

        per_rank = -(-read_manifest(cfg.data.path).num_samples(split) // env.world_size)
        batches = tqdm(batches, desc=f"bits/dim on {split}", unit="batch", total=-(-per_rank // micro))
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        if (t.inject_signal_at_eval_batch == i + 1 and t.inject_signal_rank in (-1, env.rank)
                and t.inject_signal_step in (0, step)):
            _inject_signal(t.inject_signal, i + 1, stop)
        # The forward passes need no collective, so a rank abandons its share alone; the sum below tells
        # the others, who then abandon theirs too when their own stop flag is set (a preemption signals all).
        if stop():
            total[2] = 1
            break
        x = batch.images.to(env.device)
        cond = batch.cond.to(env.device) if batch.cond is not None else None
        bpd = bits_per_dim(model, x, cond, noise=sample_noise(batch.keys, x.shape[1:], cfg.train.seed).to(env.device))
        bpd = bpd.double()
        valid = batch.valid.to(env.device)
        total[0] += bpd[valid].sum()
        total[1] += valid.sum()
    reduce_tensor(total)
    if total[2] > 0:
        return {"interrupted": True}
    count = int(total[1].item())
    return {"bits_per_dim": (total[0] / max(count, 1)).item(), "images": count}


def _inject_signal(name: str, batch: int, stop: Callable[[], bool]) -> None:
    """Test hook: a real signal to this process at a known point. It waits (10 s at most) until the handler
    has run: CPython runs handlers in the main thread, which in a Ray worker is not this one."""
    log.warning("test hook: %s at evaluation batch %d", name, batch)
    os.kill(os.getpid(), getattr(signal, name))
    deadline = time.monotonic() + 10
    while not stop() and time.monotonic() < deadline:
        time.sleep(0.01)


def write_sample_grid(model: RealNVP, path: Path, n: int, seed: int, cond: Optional[torch.Tensor] = None) -> Path:
    """n samples at temperature 1 as a square-ish grid PNG."""
    from nvp_dist.figures.grids import image_grid, save_png

    device = next(model.buffers()).device
    g = torch.Generator(device=device).manual_seed(seed)
    images = model.sample(n, temperature=1.0, cond=cond, generator=g)
    ncol = max(1, int(n ** 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(image_grid(images.cpu(), ncol), path)
