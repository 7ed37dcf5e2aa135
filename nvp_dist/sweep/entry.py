"""What `launch/sweep.py` runs: arguments -> sweep config -> Ray Tune, with exit codes a scheduler can act on.

Exit codes: 0 the sweep ran to the end and some trial reported a result (failed trials are in the table);
1 no trial reported anything; 2 a configuration or data error (a trial's data missing, or not fitting its model), found before Ray
starts.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

EXIT_NO_RESULT, EXIT_CONFIG = 1, 2


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Search Real NVP hyperparameters with Ray Tune.")
    p.add_argument("--config", required=True, help="YAML under configs/sweeps/")
    p.add_argument("overrides", nargs="*",
                   help="dotted key=value overrides of the sweep config, e.g. num_samples=8 fixed.train.steps=500")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from nvp_dist.config import ConfigError
    from nvp_dist.data import DataError
    from nvp_dist.sweep.config import load_sweep_config

    try:
        sweep = load_sweep_config(args.config, args.overrides)
        from nvp_dist.sweep.runner import run_sweep

        outcome = run_sweep(sweep)
    except (ConfigError, DataError) as err:
        print(f"nvp-dist sweep: {err}", file=sys.stderr)
        return EXIT_CONFIG
    return 0 if outcome.best_yaml is not None else EXIT_NO_RESULT
