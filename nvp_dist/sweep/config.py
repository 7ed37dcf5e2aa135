"""The typed sweep configuration: which training config to start from, what to search, how to schedule.

`load_sweep_config(path, overrides)` merges a YAML file and `key=value` overrides onto `SweepConfig`; an
unknown key or a wrong type raises `ConfigError` naming the dotted key. The search space and the fixed
training overrides are checked against the training schema too (`load_config` on the base config), so a
misspelt `train.lrr` fails before Ray starts.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nvp_dist.config import Config, ConfigError, load_config

SPACE_TYPES = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "pbt", "fifo")
SEARCHERS = ("random", "optuna")
# The trainer restores these from the checkpoint it resumes (optimiser state, scheduler base rate) and
# the model's shape must match the checkpoint: PBT mutating them would be silently ignored or fail.
PBT_FROZEN = ("model.", "train.lr", "train.l2", "train.adam_betas", "train.adam_eps", "train.zero_stage")


@dataclass
class ParamSpec:
    # grid (every value, times num_samples) | choice | uniform | loguniform | randint (integers in [low, high)).
    type: str = "choice"
    values: List[Any] = field(default_factory=list)
    low: Optional[float] = None
    high: Optional[float] = None


@dataclass
class SchedulerConfig:
    # asha (stop trials that fall behind) | pbt (clone the best trials' checkpoints, perturb) | fifo (none).
    type: str = "asha"
    # Measured in training steps (the `step` each evaluation reports), so a resumed trial keeps its place.
    grace_period: int = 100
    reduction_factor: int = 2
    # ASHA's last rung; 0 = train.steps of the base config with `fixed` applied.
    max_t: int = 0
    # PBT: steps between exploit/explore decisions (align with train.eval_every and checkpoint_every).
    perturbation_interval: int = 1000


@dataclass
class SearchConfig:
    # random (Tune's variant generator; the only one that runs `grid`) | optuna (TPE; needs the optuna package).
    algorithm: str = "random"
    seed: Optional[int] = None


@dataclass
class ResourcesConfig:
    # Ray Train workers per trial: the DeepSpeed ranks of one trial's training run.
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # The Tune trial actor that drives the trial's TorchTrainer; Ray refuses 0 for a Tune trial.
    driver_cpus: float = 0.1


@dataclass
class SweepConfig:
    # The experiment's directory name under `storage`; also what a restarted driver restores.
    name: str = "sweep"
    # Base training config (YAML under configs/); relative paths are taken from the current directory.
    base: str = "configs/default.yaml"
    # Training keys fixed for every trial, dotted (`train.steps: 100`) or nested (`train: {steps: 100}`).
    fixed: Dict[str, Any] = field(default_factory=dict)
    # Searched training keys -> ParamSpec; keys dotted or nested like `fixed`.
    space: Dict[str, Any] = field(default_factory=dict)
    # The validation metric the trainer reports on every evaluation; lower is better.
    metric: str = "bits_per_dim"
    num_samples: int = 1
    max_concurrent: int = 1
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # Local or shared filesystem path (the trainer writes checkpoints there with plain file I/O; on a
    # multi-node cluster it must be mounted on every node).
    storage: str = "runs/sweeps"
    # Times Tune starts a failed trial again, from its last reported checkpoint: a trial whose workers were
    # preempted (SIGTERM: the trainer checkpoints and reports first) or died. A diverged trial is not retried.
    max_failures: int = 0

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage) / self.name

    def fixed_overrides(self) -> List[str]:
        return [override(k, v) for k, v in flatten(self.fixed).items()]

    def specs(self) -> Dict[str, ParamSpec]:
        return {k: _typed_spec(k, v) for k, v in _flatten_space(self.space).items()}

    def trial_overrides(self, sampled: Dict[str, Any]) -> List[str]:
        """Training overrides for one trial: the fixed ones, then the sampled values (dotted keys)."""
        return self.fixed_overrides() + [override(k, v) for k, v in sampled.items()]

    def training_config(self, sampled: Dict[str, Any], *extra: str) -> Config:
        return load_config(self.base, [*self.trial_overrides(sampled), *extra])


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"train": {"lr": 1}} and {"train.lr": 1} both become {"train.lr": 1}."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _nest(tree: Dict[str, Any]) -> Dict[str, Any]:
    """{"train.lr": 1, "train": {"steps": 2}} -> {"train": {"lr": 1, "steps": 2}}."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        head, _, rest = str(key).partition(".")
        if isinstance(value, dict):
            value = _nest(value)
        if rest:
            value = _nest({rest: value})
        if isinstance(out.get(head), dict) and isinstance(value, dict):
            value = _nest({**flatten(out[head]), **flatten(value)})
        out[head] = value
    return out


def _flatten_space(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    # A mapping with a `type` key is a leaf (a ParamSpec); anything else nests training keys.
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if not isinstance(value, dict):
            raise ConfigError(f"space.{dotted}: expected a mapping with a 'type' ({', '.join(SPACE_TYPES)})")
        out.update({dotted: value} if "type" in value else _flatten_space(value, dotted + "."))
    return out


def _typed_spec(key: str, raw: Dict[str, Any]) -> ParamSpec:
    try:
        spec: ParamSpec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ParamSpec), raw))
    except OmegaConfBaseException as err:
        inner = getattr(err, "full_key", None)
        raise ConfigError(f"space.{key}{'.' + inner if inner else ''}: {str(err).splitlines()[0]}") from None
    if spec.type not in SPACE_TYPES:
        raise ConfigError(f"space.{key}.type must be one of {', '.join(SPACE_TYPES)}, not {spec.type!r}")
    if spec.type in ("grid", "choice"):
        if not spec.values:
            raise ConfigError(f"space.{key}: {spec.type} needs a non-empty 'values' list")
    elif spec.low is None or spec.high is None or not spec.low < spec.high:
        raise ConfigError(f"space.{key}: {spec.type} needs low < high")
    elif spec.type == "loguniform" and spec.low <= 0:
        raise ConfigError(f"space.{key}: loguniform needs low > 0")
    return spec


def override(key: str, value: Any) -> str:
    """A `key=value` training override whose value reads back as `value`."""
    return f"{key}={_override_value(value)}"


def _override_value(value: Any) -> str:
    """A value as `from_dotlist` (YAML) reads it back; Tune samples numpy scalars."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if value is None or isinstance(value, (bool, np.bool_)):
        return "null" if value is None else str(bool(value)).lower()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))  # full precision, and no "np.float64(...)"
    return "'" + str(value).replace("'", "''") + "'"  # a YAML single-quoted scalar


def representative(spec: ParamSpec) -> Any:
    if spec.type in ("grid", "choice"):
        return spec.values[0]
    return int(spec.low) if spec.type == "randint" else spec.low


def load_sweep_config(path: str | Path, overrides: Iterable[str] = ()) -> SweepConfig:
    """The typed sweep config for a YAML file plus `key=value` overrides, with paths made absolute."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep config not found: {path}")
    overrides = [o[2:] if o.startswith("--") else o for o in overrides]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
        # Nest dotted keys first, so that `space.train.lr.high=...` on the command line lands in the
        # entry the file wrote as `train.lr:`.
        for section in ("fixed", "space"):
            if isinstance(loaded, dict) and isinstance(loaded.get(section), dict):
                loaded[section] = _nest(loaded[section])
        cfg = OmegaConf.merge(OmegaConf.structured(SweepConfig), loaded)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        sweep: SweepConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{path}{f' at {key!r}' if key else ''}: {str(err).splitlines()[0]}") from None
    # Tune runs trials in other processes with other working directories: pin every path now.
    sweep.base = str(Path(sweep.base).resolve())
    sweep.storage = str(Path(sweep.storage).resolve())
    data_path = load_config(sweep.base, sweep.fixed_overrides()).data.path
    if "://" not in data_path and not data_path.startswith("pipe:"):
        sweep.fixed = {**flatten(sweep.fixed), "data.path": str(Path(data_path).resolve())}
    validate(sweep)
    return sweep


def validate(sweep: SweepConfig) -> None:
    specs = sweep.specs()
    if not specs:
        raise ConfigError("space is empty: name at least one training key to search")
    checks = [
        (sweep.scheduler.type in SCHEDULERS, f"scheduler.type must be one of {', '.join(SCHEDULERS)}"),
        (sweep.search.algorithm in SEARCHERS, f"search.algorithm must be one of {', '.join(SEARCHERS)}"),
        (sweep.metric == "bits_per_dim", "metric must be bits_per_dim (the trainer's validation metric)"),
        (sweep.num_samples >= 1 and sweep.max_concurrent >= 1, "num_samples and max_concurrent must be >= 1"),
        (sweep.resources.workers >= 1, "resources.workers must be >= 1"),
        (sweep.max_failures >= 0, "max_failures must be >= 0"),
        (sweep.resources.cpus_per_worker > 0 and sweep.resources.driver_cpus > 0,
         "resources.cpus_per_worker and resources.driver_cpus must be > 0 (Ray refuses 0-CPU trials)"),
        (sweep.scheduler.grace_period >= 1 and sweep.scheduler.reduction_factor >= 2,
         "scheduler.grace_period must be >= 1 and scheduler.reduction_factor >= 2"),
        (sweep.search.algorithm != "optuna" or all(s.type != "grid" for s in specs.values()),
         "search.algorithm=optuna cannot run 'grid' entries: use 'choice'"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if sweep.scheduler.type == "pbt":
        frozen = [k for k in specs if k.startswith(PBT_FROZEN)]
        if frozen:
            raise ConfigError(f"scheduler.type=pbt cannot mutate {', '.join(frozen)}: a trial resumed from a "
                              "cloned checkpoint keeps the model's shape and the optimiser state it saved")
    # Every key and value type must fit the training schema: fail now, not in the first trial.
    steps = sweep.training_config({k: representative(s) for k, s in specs.items()}).train.steps
    max_t = sweep.scheduler.max_t or steps
    if sweep.scheduler.type == "asha" and sweep.scheduler.grace_period > max_t:
        raise ConfigError(f"scheduler.grace_period={sweep.scheduler.grace_period} exceeds ASHA's max_t={max_t} "
                          "(scheduler.max_t, or train.steps when 0): no trial could be compared")
