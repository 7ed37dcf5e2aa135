"""What `launch/train.py` runs: arguments -> config -> Trainer, with exit codes a scheduler can act on.

Exit codes (nvp_dist/train/failures.py, the README's table): 0 done; 1 anything else; 2 configuration or
data error (not worth a retry); 3 training diverged; 143 stopped by SIGTERM or SIGINT after a checkpoint.
A failing rank tells the others through the watchdog (nvp_dist/train/watchdog.py): every rank then exits
within seconds with the culprit's code, and logs its rank and message.
"""
from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing
import os
import sys
from typing import List, Optional

from nvp_dist.train.failures import EXIT_CONFIG, EXIT_FAILED

log = logging.getLogger("nvp_dist.train")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train Real NVP with DeepSpeed.")
    p.add_argument("--config", required=True, help="YAML under configs/")
    p.add_argument("--resume", default="none",
                   help="none (refuse an out_dir that has checkpoints), auto (newest valid checkpoint), or a checkpoint directory")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    # Intermixed: overrides may follow --resume (launch/demo.sh passes the user's after its own flags).
    return p.parse_intermixed_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run, and record the exit code for the launcher's wrapper (failures.record_exit); fail() records its
    own before os._exit. A rank the watchdog stops (os._exit in its thread) records nothing."""
    from nvp_dist.train.failures import record_exit

    try:
        code = run(argv)
    except SystemExit as stop:  # argparse: a usage error (2) or --help (0)
        code = int(stop.code or 0)
    record_exit(code)
    return code


def run(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from nvp_dist.config import ConfigError, load_config
    from nvp_dist.data import DataError
    from nvp_dist.train import watchdog

    try:
        cfg = load_config(args.config, args.overrides)
        from nvp_dist.train.trainer import Trainer

        trainer = Trainer(cfg, resume=args.resume)
        # torch, DeepSpeed and the model are a heap of objects that live until exit. Frozen, the collector
        # stops rescanning them in every full collection, and the interpreter's collections at exit skip
        # them: 3.2 -> 0.45 s from the last line printed to the process's end (debug config, measured).
        gc.freeze()
    except (ConfigError, DataError, ValueError) as err:
        print(f"nvp-dist train: {err}", file=sys.stderr)
        watchdog.report_failure(EXIT_CONFIG, str(err))  # when only this rank found it (a port, a file)
        return EXIT_CONFIG
    except Exception as err:
        fail(err)
    from nvp_dist.train.distributed import shutdown

    try:
        result = trainer.train()
        if trainer.env.is_main:
            print(f"final {cfg.data.eval_split} bits/dim: {result.get('bits_per_dim', float('nan')):.4f} "
                  f"| samples: {result.get('samples')} | model: {trainer.out / 'model_fp32.pt'}", flush=True)
        watchdog.finished()
        return 0
    except SystemExit as stop:  # the trainer's stop after a checkpoint, decided on every rank alike
        watchdog.finished()
        return stop.code
    except BaseException as err:
        fail(err, getattr(trainer, "saving", None))
    finally:
        trainer.close()
        shutdown(trainer.env)


def fail(err: BaseException, saving=None) -> None:
    """Log this rank's failure, tell the other ranks, and exit with its code at once: the process group's
    teardown could wait on peers that are gone or blocked in a collective."""
    from nvp_dist.train import failures, watchdog
    from nvp_dist.train.distributed import read_env

    code, rank = failures.exit_code(err), read_env().rank
    message = failures.describe(err, saving)
    log.error("rank %d failed (exit code %d): %s", rank, code, message,
              exc_info=err if code == EXIT_FAILED else None)
    watchdog.report_failure(code, message)
    failures.record_exit(code)
    # DataLoader workers would serve on for their SIGTERM grace period, holding the launcher's wait.
    for child in multiprocessing.active_children():
        child.kill()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
