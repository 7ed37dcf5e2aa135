"""`nvp-dist` command line: one subcommand per job, each implemented in the subpackage that owns it.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; modules are imported only
when their subcommand runs, so `nvp-dist config` does not pay for importing DeepSpeed or Ray.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "config": ("nvp_dist.config_cli", "print the resolved config and the model's parameter count"),
    "shards": ("nvp_dist.data.cli", "convert a data set to WebDataset shards, or --verify shards"),
    "eval": ("nvp_dist.train.eval_cli", "exact bits/dim of a checkpoint on a split"),
    "export": ("nvp_dist.train.export_cli", "write a consolidated fp32 model file from a checkpoint"),
    "figures": ("nvp_dist.figures.cli", "the paper's figures from a checkpoint"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nvp-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:  # import only the module that runs
            importlib.import_module(module).add_arguments(p)
    args, rest = parser.parse_known_args(argv) if chosen is None else (parser.parse_args(argv), [])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    code = importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    # The interpreter's collections at exit would rescan every object torch and DeepSpeed made (about a
    # second for `eval`); frozen objects are skipped.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
