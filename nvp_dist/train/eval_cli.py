"""`nvp-dist eval --checkpoint C [--config X] [--split S]`: exact bits/dim of a trained model on one device.

C is an exported fp32 model file, a checkpoint directory (any ZeRO stage), a checkpoints/ directory or a
run directory. --config overrides the data section (e.g. another data.path); its model section must
match the checkpoint's.
"""
from __future__ import annotations

import argparse
import json
import sys



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model_fp32.pt, a checkpoint dir, checkpoints/ or a run dir")
    p.add_argument("--config", help="YAML whose data section to evaluate with (default: the checkpoint's own)")
    p.add_argument("--split", help="split to evaluate (default: data.eval_split)")
    p.add_argument("--no-ema", action="store_true", help="use the live weights, not the Polyak averages")
    p.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (0: the whole split)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of --config")


def run(args: argparse.Namespace) -> int:
    from nvp_dist.config import ConfigError, load_config
    from nvp_dist.data import DataError
    from nvp_dist.train.distributed import read_env
    from nvp_dist.train.evaluate import evaluate
    from nvp_dist.train.export import load_inference_model

    env = read_env()
    try:
        cfg = load_config(args.config, args.overrides) if args.config else None
        model, cfg, step = load_inference_model(args.checkpoint, use_ema=not args.no_ema, device=env.device, config=cfg)
        result = evaluate(model, cfg, env, split=args.split, max_batches=args.max_batches)
    except (ConfigError, DataError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"nvp-dist eval: {err}", file=sys.stderr)
        return 2
    result.update(step=step, config=cfg.name, split=args.split or cfg.data.eval_split, checkpoint=args.checkpoint)
    print(json.dumps(result))
    return 0
