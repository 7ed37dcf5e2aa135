"""`nvp-dist export --checkpoint C --out model.pt`: a consolidated fp32 model file from any checkpoint
(any ZeRO stage), for `nvp-dist eval`, `nvp-dist figures` and plain PyTorch on one device."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, checkpoints/ or a run dir")
    p.add_argument("--out", required=True, help="the .pt file to write")


def run(args: argparse.Namespace) -> int:
    from nvp_dist.train.export import export_fp32, resolve_tag_dir

    try:
        out = export_fp32(resolve_tag_dir(Path(args.checkpoint)), Path(args.out))
    except (FileNotFoundError, RuntimeError, ValueError) as err:  # ValueError: a file refused by safe_load
        print(f"nvp-dist export: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0
