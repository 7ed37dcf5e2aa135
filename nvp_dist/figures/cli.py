"""`nvp-dist figures KIND --checkpoint C [--config X] [--out DIR] [options]`: the paper's figures from any
trained model (an exported fp32 file or a checkpoint directory of any ZeRO stage; Polyak weights when the
run kept them). Files are named `{config}-step{N}-{kind}...`; toy2d trains its own 2-D flow and needs no
checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

KINDS = ("samples", "extrapolate", "compression", "manifold", "attributes", "toy2d")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--checkpoint", help="model_fp32.pt, a checkpoint dir, checkpoints/ or a run dir")
    p.add_argument("--config", help="YAML whose data section supplies the images (default: the checkpoint's)")
    p.add_argument("--out", default="figures", help="output folder (default: figures/)")
    p.add_argument("--split", help="split the images come from (default: data.eval_split)")
    p.add_argument("--n", type=int, default=8, help="grid side for samples; images for compression/attributes")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    p.add_argument("--factors", type=int, nargs="+", default=[2, 10], help="extrapolation size factors")
    p.add_argument("--m", type=int, default=8, help="manifold grid side (a multiple of 4)")
    p.add_argument("--frames", type=int, default=16, help="frames of the manifold GIF (a multiple of 4)")
    p.add_argument("--flip", nargs="*", default=None,
                   help="attribute names to flip, or classes to decode as (attributes; default: every class)")
    p.add_argument("--steps", type=int, default=500, help="toy2d training steps")
    p.add_argument("--zoom", type=int, default=1, help="enlarge every written image by this factor (nearest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the live weights, not the Polyak averages")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", help="key=value overrides of --config")


def _images(cfg, split: str, n: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first n valid images of a split (deterministic: evaluation order, centre crops)."""
    from nvp_dist.data import eval_batches

    images, conds = [], []
    for batch in eval_batches(cfg.data, split, batch_size=max(n, 1)):
        images.append(batch.images[batch.valid])
        if batch.cond is not None:
            conds.append(batch.cond[batch.valid])
        if sum(len(i) for i in images) >= n:
            break
    x = torch.cat(images)[:n]
    if len(x) < n:
        raise ValueError(f"split {split!r} has only {len(x)} images; {n} needed")
    return x, (torch.cat(conds)[:n] if conds else None)


def _zoom(paths: List[Path], factor: int) -> None:
    from PIL import Image

    for path in paths:
        img = Image.open(path)
        frames = []
        for i in range(getattr(img, "n_frames", 1)):
            img.seek(i)
            frames.append(img.convert("RGB").resize((img.width * factor, img.height * factor), Image.NEAREST))
        if len(frames) > 1:
            frames[0].save(path, save_all=True, append_images=frames[1:], loop=0,
                           duration=img.info.get("duration", 120))
        else:
            frames[0].save(path)


def draw(args: argparse.Namespace) -> List[Path]:
    from nvp_dist import figures
    from nvp_dist.config import load_config
    from nvp_dist.train.export import load_inference_model

    out = Path(args.out)
    if args.kind == "toy2d":
        return [figures.toy2d(out_dir=out, tag="toy2d", steps=args.steps, seed=args.seed).path]
    if not args.checkpoint:
        raise ValueError(f"figures {args.kind} needs --checkpoint")
    cfg = load_config(args.config, args.overrides) if args.config else None
    model, cfg, step = load_inference_model(args.checkpoint, use_ema=not args.no_ema, device=args.device, config=cfg)
    tag = f"{cfg.name}-step{step}"
    split = args.split or cfg.data.eval_split
    common = dict(out_dir=out, tag=tag)
    if args.kind == "samples":
        data, cond = _images(cfg, split, args.n * args.n)
        found = figures.samples(model, data, n=args.n, temperatures=args.temperatures, cond=cond, seed=args.seed, **common)
    elif args.kind == "extrapolate":
        cond = _images(cfg, split, 4)[1]
        found = figures.extrapolate(model, n=2, factors=args.factors, cond=cond, seed=args.seed, **common)
    elif args.kind == "compression":
        data, cond = _images(cfg, split, args.n)
        found = [figures.compression(model, data, cond=cond, seed=args.seed, **common)]
    elif args.kind == "manifold":
        data, cond = _images(cfg, split, 8)
        found = [figures.manifold(model, data[:4], m=args.m, cond=None if cond is None else cond[:4], **common),
                 figures.manifold_animation(model, data, m=args.m, frames=args.frames, cond=cond, **common)]
    else:  # attributes
        from nvp_dist.data import read_manifest

        data, cond = _images(cfg, split, args.n)
        if cond is None:
            raise ValueError("figures attributes needs a model trained with data.cond=attributes or class")
        names = read_manifest(cfg.data.path).cond_names
        classes = cfg.data.cond == "class"
        if args.flip is None and not classes:
            raise ValueError("figures attributes needs --flip NAME [NAME ...] (attribute names to flip)")
        flips = names if args.flip is None else args.flip
        found = [figures.attributes(model, data, cond, names, flips, classes=classes, **common)]
    return [f.path for f in found]


def run(args: argparse.Namespace) -> int:
    from nvp_dist.config import ConfigError
    from nvp_dist.data import DataError

    try:
        paths = draw(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"nvp-dist figures: {err}", file=sys.stderr)
        return 2
    if args.zoom > 1:
        _zoom(paths, args.zoom)
    for p in paths:
        print(p)
    return 0
