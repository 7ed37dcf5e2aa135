"""Sweep configs without Ray running: the shipped files load, bad keys fail with their dotted name, search
spaces become Tune domains, and sampled values reach the training config intact."""
from pathlib import Path

import numpy as np
import pytest
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, PopulationBasedTraining

from nvp_dist.config import ConfigError
from nvp_dist.sweep import load_sweep_config
from nvp_dist.sweep.search import param_space, tune_config

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "configs" / "sweeps"
TINY = SWEEPS / "tiny.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    # ASHA's default grace period (100 steps) exceeds the debug config's 20 steps.
    scheduler = "" if "scheduler:" in text else "scheduler: {grace_period: 5}\n"
    path.write_text(f"base: {ROOT / 'configs' / 'debug.yaml'}\n{scheduler}" + text)
    return path


def test_shipped_sweeps_load_and_build_their_tune_config():
    tiny = load_sweep_config(TINY)
    assert set(tiny.specs()) == {"train.lr", "model.mid_channels"}
    assert param_space(tiny)["train.lr"] == {"grid_search": [3e-3, 1e-3, 1e-6, 3e-6]}
    cifar = load_sweep_config(SWEEPS / "cifar10.yaml")
    space = param_space(cifar)
    assert set(space) == {"train.lr", "model.res_blocks", "model.mid_channels", "train.warmup_steps"}
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    config = tune_config(cifar)
    assert isinstance(config.scheduler, AsyncHyperBandScheduler) and config.mode == "min"
    assert config.metric == "bits_per_dim" and config.num_samples == 32
    # Paths are pinned: trials run elsewhere, in other working directories.
    assert Path(cifar.base).is_absolute() and Path(cifar.fixed["data.path"]).is_absolute()
    assert cifar.training_config({"train.lr": 1e-4, "model.res_blocks": 4}).model.res_blocks == 4
    # bf16 against fp32 (benchmarks/bench_precision.py): every seed in both precisions, all to the end.
    precision = load_sweep_config(SWEEPS / "precision.yaml")
    assert param_space(precision) == {"train.precision": {"grid_search": ["fp32", "bf16"]},
                                      "train.seed": {"grid_search": list(range(17))}}
    assert type(tune_config(precision).scheduler) is FIFOScheduler


@pytest.mark.parametrize("text,key", [
    ("num_sample: 3\nspace: {train.lr: {type: choice, values: [1]}}\n", "num_sample"),
    ("scheduler: {type: asha, grace: 3}\nspace: {train.lr: {type: choice, values: [1]}}\n", "scheduler.grace"),
    ("space: {train.lr: {type: loguniform, low: 1.0e-4, hgh: 1.0}}\n", "space.train.lr.hgh"),
    ("space: {train.lrr: {type: choice, values: [0.1]}}\n", "train.lrr"),
    ("fixed: {train: {stepz: 3}}\nspace: {train.lr: {type: choice, values: [0.1]}}\n", "train.stepz"),
    ("space: {train.lr: {type: normal, low: 0, high: 1}}\n", "space.train.lr.type"),
    ("space: {train.lr: {type: loguniform, low: 0, high: 1}}\n", "space.train.lr"),
    ("scheduler: {grace_period: 50}\nspace: {train.lr: {type: choice, values: [0.1]}}\n", "scheduler.grace_period"),
])
def test_bad_keys_and_values_fail_with_their_dotted_name(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_sweep_config(write(tmp_path, text))


def test_nested_and_dotted_keys_agree_and_cli_overrides_reach_the_trials(tmp_path):
    nested = write(tmp_path, "fixed: {train: {steps: 7}}\nspace: {train: {lr: {type: choice, values: [0.1]}}}\n")
    sweep = load_sweep_config(nested, ["fixed.train.eval_every=7", "fixed.data.path=rel/digits", "num_samples=3"])
    assert set(sweep.specs()) == {"train.lr"} and sweep.num_samples == 3
    # Sampled values arrive as numpy scalars and odd strings; they must read back unchanged.
    cfg = sweep.training_config({"train.lr": np.float64(1e-5), "train.seed": np.int64(3),
                                 "name": "a 'quoted': name", "train.adam_betas": [0.5, 0.9]})
    assert cfg.train.lr == 1e-5 and cfg.train.seed == 3 and cfg.name == "a 'quoted': name"
    assert cfg.train.steps == 7 and cfg.train.eval_every == 7 and cfg.train.adam_betas == [0.5, 0.9]
    assert cfg.data.path == str(Path("rel/digits").resolve())


def test_pbt_mutates_only_what_a_resumed_trainer_adopts(tmp_path):
    for key in ("model.res_blocks", "train.lr"):
        values = "[1, 2]" if key.startswith("model") else "[0.1, 0.2]"
        text = f"scheduler: {{type: pbt}}\nspace: {{{key}: {{type: choice, values: {values}}}}}\n"
        with pytest.raises(ConfigError, match=f"cannot mutate {key}"):
            load_sweep_config(write(tmp_path, text))
    sweep = load_sweep_config(write(tmp_path, "scheduler: {type: pbt, perturbation_interval: 10}\n"
                                    "space: {train.warmup_steps: {type: randint, low: 0, high: 50}}\n"))
    pbt = tune_config(sweep).scheduler
    assert isinstance(pbt, PopulationBasedTraining) and "train.warmup_steps" in pbt._hyperparam_mutations


def test_optuna_runs_sampled_spaces_but_not_grids(tmp_path):
    grid = "search: {algorithm: optuna}\nspace: {train.lr: {type: grid, values: [0.1, 0.2]}}\n"
    with pytest.raises(ConfigError, match="cannot run 'grid'"):
        load_sweep_config(write(tmp_path, grid))
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    sweep = load_sweep_config(write(tmp_path, "search: {algorithm: optuna, seed: 1}\nmax_concurrent: 3\n"
                                    "space: {train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}\n"))
    config = tune_config(sweep)
    assert isinstance(config.search_alg, OptunaSearch) and config.max_concurrent_trials == 3


def test_sweep_without_its_data_exits_2_naming_the_path_before_ray_starts(tmp_path):
    """The README's sweep command on a clone whose demo has not yet written data/digits."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # a clone's files, without data/
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "--config", "configs/sweeps/tiny.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"no data set at {tmp_path / 'data' / 'digits'}" in proc.stderr, proc.stderr
    # Ray never started: no local instance announced, no experiment directory made.
    assert "Ray" not in proc.stdout + proc.stderr and not (tmp_path / "runs").exists()
