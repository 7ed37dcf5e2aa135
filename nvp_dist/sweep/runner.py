"""Running a sweep: connect to Ray, start the Tuner or restore the one a dead driver left, collect results.

A sweep's experiment directory (`storage/name`) holds Tune's state, each trial's Tune checkpoints,
`sweep.yaml` (the resolved sweep config it was started with), the trainers' runs (`trainer-runs/`)
and, at the end, `trials.csv` and `best.yaml`. Starting the same sweep again restores it: finished and
failed trials keep their results; unfinished ones resume from their latest checkpoint.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import ray
from omegaconf import OmegaConf
from ray import tune

from nvp_dist.config import Config, ConfigError
from nvp_dist.sweep.config import SweepConfig, representative
from nvp_dist.sweep.results import TrialRow, best_row, collect_rows, format_table, write_best_yaml, write_csv
from nvp_dist.sweep.search import param_space, tune_config
from nvp_dist.sweep.trial import run_trial

log = logging.getLogger("nvp_dist.sweep")


@dataclass
class SweepOutcome:
    rows: List[TrialRow]
    csv: Path
    best_yaml: Optional[Path]
    restored: bool


def connect() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local Ray on this machine's cores."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)


def _trainable(sweep: SweepConfig):
    # with_parameters puts the sweep config in the object store once instead of in every trial's config.
    return tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"cpu": sweep.resources.driver_cpus})


def _snapshot(sweep: SweepConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(sweep))


def _check_same_sweep(sweep: SweepConfig) -> None:
    stored = sweep.experiment_dir / "sweep.yaml"
    restorable = stored.is_file() and tune.Tuner.can_restore(str(sweep.experiment_dir))
    if restorable and stored.read_text() != _snapshot(sweep):
        raise ConfigError(f"{sweep.experiment_dir} holds a sweep started with another configuration ({stored}); "
                          "restore it with the same file and overrides, or give this sweep another name")


def _tuner(sweep: SweepConfig) -> tuple[tune.Tuner, bool]:
    exp = sweep.experiment_dir
    if tune.Tuner.can_restore(str(exp)):
        log.info("restoring the sweep in %s", exp)
        # Errored trials (diverged) stay failed; unfinished ones continue from their Tune checkpoints.
        return tune.Tuner.restore(str(exp), trainable=_trainable(sweep), resume_unfinished=True,
                                  resume_errored=False), True
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "sweep.yaml").write_text(_snapshot(sweep))
    run_config = tune.RunConfig(
        name=sweep.name, storage_path=sweep.storage,
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        # A trial resumes from its newest; PBT clones one that may be many reports old by the time the
        # cloning trial restarts, so under PBT every checkpoint stays.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None if sweep.scheduler.type == "pbt" else 3),
    )
    tuner = tune.Tuner(_trainable(sweep), param_space=param_space(sweep), tune_config=tune_config(sweep),
                       run_config=run_config)
    return tuner, False


def trial_configs(sweep: SweepConfig) -> Iterator[Config]:
    """The training config of every distinct data/model combination the space can give a trial: each
    listed value of a `data.*` or `model.*` key (the other keys at a representative value). Continuous
    ranges of model keys keep their representative (their lower bound)."""
    specs = sweep.specs()
    base = {k: representative(s) for k, s in specs.items()}
    yield sweep.training_config(base)
    for key, spec in specs.items():
        if key.startswith(("data.", "model.")) and spec.type in ("grid", "choice"):
            for value in spec.values[1:]:
                yield sweep.training_config({**base, key: value})


def check_trial_data(sweep: SweepConfig) -> None:
    """The check `launch/train.py` makes (manifest, splits, image shape, conditioning) for every trial's
    data, before Ray starts: a missing data set is named here, not as a WorkerGroupError in a worker."""
    from nvp_dist.train.trainer import check_data

    for cfg in trial_configs(sweep):
        check_data(cfg)


def run_sweep(sweep: SweepConfig) -> SweepOutcome:
    """Run (or resume) the sweep to the end; print and write the trial table and the best config.
    Raises ConfigError or DataError before Ray starts when the sweep or a trial's data cannot work."""
    _check_same_sweep(sweep)  # before Ray starts: a mismatch needs no cluster to report
    check_trial_data(sweep)
    connect()
    tuner, restored = _tuner(sweep)
    results = tuner.fit()
    rows = collect_rows(sweep, results)
    print(format_table(sweep, rows), flush=True)
    csv = write_csv(sweep, rows, sweep.experiment_dir / "trials.csv")
    best = best_row(rows)
    best_yaml = write_best_yaml(sweep, best, sweep.experiment_dir / "best.yaml") if best else None
    print(f"trials: {csv}\nbest config: {best_yaml or 'none (no trial reported a result)'}", flush=True)
    return SweepOutcome(rows, csv, best_yaml, restored)
