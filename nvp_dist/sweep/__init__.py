"""Hyperparameter sweeps with Ray Tune, each trial a distributed Ray Train run of the same trainer."""
from nvp_dist.sweep.config import ParamSpec, SweepConfig, load_sweep_config

__all__ = ["ParamSpec", "SweepConfig", "load_sweep_config"]
