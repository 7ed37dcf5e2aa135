"""`nvp-dist config CONFIG [key=value ...]`: the resolved config and the model's parameter count."""
from __future__ import annotations

import argparse
import sys

from nvp_dist.config import ConfigError, load_config, to_yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML file under configs/")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.res_blocks=4")


def parameter_count(cfg) -> int:
    from nvp_dist.flows import RealNVP

    return sum(p.numel() for p in RealNVP(cfg.model).parameters())


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"nvp-dist config: {err}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    print(f"# parameters: {parameter_count(cfg):,}")
    return 0
