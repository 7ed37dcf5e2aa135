"""`nvp-dist figures KIND --checkpoint C [--config X] [--out DIR] [options]`: the paper's figures from any
trained model (an exported fp32 file or a checkpoint directory of any ZeRO stage; Polyak weights when the
run kept them). Files are named `{config}-step{N}-{kind}...`; toy2d trains its own 2-D flow and needs no
checkpoint. `page` writes the authors' visualisation page (index.html and its images) for one or more
checkpoints (see nvp_dist.figures.page).

Images come from the evaluation split at `--indices` (positions in evaluation order), by default a random
choice drawn from `--seed`, so a figure shows the same images on every machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import torch

KINDS = ("samples", "extrapolate", "compression", "manifold", "attributes", "toy2d", "page")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--checkpoint", action="append",
                   help="model_fp32.pt, a checkpoint dir, checkpoints/ or a run dir (page: repeat for more rows)")
    p.add_argument("--config", help="YAML whose data section supplies the images (default: the checkpoint's)")
    p.add_argument("--out", default="figures", help="output folder (default: figures/)")
    p.add_argument("--split", help="split the images come from (default: data.eval_split)")
    p.add_argument("--n", type=int, default=8, help="grid side for samples; images for compression/attributes")
    p.add_argument("--indices", type=int, nargs="+",
                   help="evaluation images to use, by position (default: a random choice drawn from --seed)")
    p.add_argument("--temperatures", type=float, nargs="+", default=None,
                   help="sampling temperatures (default: 1 0.7); compression and page take one (default: 1), "
                        "the temperature of the resampled latents and of the page's samples")
    p.add_argument("--fractions", type=float, nargs="+", default=None,
                   help="compression: fractions of the latents kept (default: the paper's 1 0.5 0.25 0.125 0.0625)")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 10], help="extrapolation size factors")
    p.add_argument("--m", type=int, default=8, help="manifold grid side (a multiple of 4)")
    p.add_argument("--frames", type=int, default=16, help="frames of the manifold GIF (a multiple of 4)")
    p.add_argument("--flip", nargs="*", default=None,
                   help="attribute names to flip, or classes to decode as (attributes; default: every class)")
    p.add_argument("--attributes-from", type=int, metavar="INDEX",
                   help="attributes: also decode every row with the attribute vector of evaluation image INDEX")
    p.add_argument("--toy2d", action="store_true", help="page: add the Figure 1 section (trains the toy flow)")
    p.add_argument("--steps", type=int, default=1400, help="toy2d training steps")
    p.add_argument("--zoom", type=int, default=1,
                   help="enlarge every written image by this factor (nearest; not page, whose cells are scaled by the browser)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the live weights, not the Polyak averages")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", help="key=value overrides of --config")


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


def one_temperature(args: argparse.Namespace) -> float:
    """The single temperature of compression and page: their T is in captions, so two would be ambiguous."""
    if args.temperatures is None:
        return 1.0
    if len(args.temperatures) != 1:
        raise ValueError(f"figures {args.kind} draws at one temperature; --temperatures gave {args.temperatures}")
    return args.temperatures[0]


def draw(args: argparse.Namespace) -> List[Path]:
    from nvp_dist import figures
    from nvp_dist.config import load_config
    from nvp_dist.figures.compression import PAPER_FRACTIONS
    from nvp_dist.figures.examples import choose_images, eval_images
    from nvp_dist.figures.page import safe_tag
    from nvp_dist.train.export import load_inference_model

    out = Path(args.out)
    temperatures = args.temperatures or [1.0, 0.7]
    if args.kind == "toy2d":
        return [figures.toy2d(out_dir=out, tag="toy2d", steps=args.steps, seed=args.seed).path]
    if not args.checkpoint:
        raise ValueError(f"figures {args.kind} needs --checkpoint")
    cfg = load_config(args.config, args.overrides) if args.config else None
    if args.kind == "page":
        from nvp_dist.figures.page import PageOptions, write_page

        # The page's images and bits/dim are the evaluation split's, and the browser sizes its cells.
        if args.split is not None:
            raise ValueError("figures page shows the evaluation split (data.eval_split); set it with "
                             "--config and data.eval_split=..., not --split")
        if args.zoom != 1:
            raise ValueError("figures page does not take --zoom: the page scales its cells itself")
        options = PageOptions(n=args.n, temperature=one_temperature(args), fractions=tuple(args.fractions or PAPER_FRACTIONS),
                              indices=args.indices, m=args.m, frames=args.frames, seed=args.seed,
                              use_ema=not args.no_ema, device=args.device, toy2d=args.toy2d, toy2d_steps=args.steps)
        return [write_page(args.checkpoint, out, options, config=cfg)]
    if len(args.checkpoint) > 1:
        raise ValueError(f"figures {args.kind} draws one model; got {len(args.checkpoint)} --checkpoint")
    model, cfg, step = load_inference_model(args.checkpoint[0], use_ema=not args.no_ema, device=args.device, config=cfg)
    tag = safe_tag(f"{cfg.name}-step{step}")
    split = args.split or cfg.data.eval_split
    common = dict(out_dir=out, tag=tag)

    def pick(n: int):
        return choose_images(cfg, split, n, args.indices, args.seed)[1:]

    if args.kind == "samples":
        data, cond = pick(args.n * args.n)
        found = figures.samples(model, data, n=args.n, temperatures=temperatures, cond=cond, seed=args.seed, **common)
    elif args.kind == "extrapolate":
        cond = None
        if cfg.model.cond_dim:  # a conditional model draws under the attributes of random evaluation images
            cond = pick(args.n * args.n)[1]
        found = figures.extrapolate(model, n=args.n, factors=args.factors, temperatures=temperatures, cond=cond,
                                    seed=args.seed, **common)
    elif args.kind == "compression":
        t = one_temperature(args)
        data, cond = pick(args.n)
        fig = figures.compression(model, data, fractions=args.fractions or PAPER_FRACTIONS, cond=cond,
                                  temperature=t, seed=args.seed, **common)
        print(f"nvp-dist figures compression: resampled latents drawn at T = {t:g}", file=sys.stderr)
        if fig.note:
            print(f"nvp-dist figures compression: {fig.note}", file=sys.stderr)
        found = [fig]
    elif args.kind == "manifold":
        data, cond = pick(8)  # a conditional model encodes every example with its own vector
        found = [figures.manifold(model, data[:4], m=args.m, cond=None if cond is None else cond[:4], **common),
                 figures.manifold_animation(model, data, m=args.m, frames=args.frames, cond=cond, **common)]
    else:  # attributes
        from nvp_dist.data import read_manifest

        data, cond = pick(args.n)
        if cond is None:
            raise ValueError("figures attributes needs a model trained with data.cond=attributes or class")
        names = read_manifest(cfg.data.path).cond_names
        classes = cfg.data.cond == "class"
        if args.flip is None and not classes and args.attributes_from is None:
            raise ValueError("figures attributes needs --flip NAME [NAME ...] (attribute names to flip) "
                             "or --attributes-from INDEX")
        flips = (names if classes else []) if args.flip is None else args.flip
        cond_from = None if args.attributes_from is None else eval_images(cfg, split, [args.attributes_from])[1][0]
        found = [figures.attributes(model, data, cond, names, flips, classes=classes, cond_from=cond_from, **common)]
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
