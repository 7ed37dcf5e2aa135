"""The typed run configuration: one structured config composed of each component's own dataclass.

`load_config(path, overrides)` merges a YAML file and `key=value` overrides onto the schema; an unknown
key or a value of the wrong type raises `ConfigError` naming the dotted key, before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nvp_dist.data.config import DataConfig
from nvp_dist.flows.config import ModelConfig
from nvp_dist.metrics.config import MetricsConfig
from nvp_dist.train.config import TrainConfig


@dataclass
class Config:
    # The run's name; defaults to the YAML file's stem. Shows in metrics, file names and captions.
    name: str = "unnamed"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


class ConfigError(ValueError):
    """A configuration that does not fit the schema or is inconsistent; the message names the key."""


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    where = f" at '{key}'" if key else ""
    return ConfigError(f"{source}{where}: {msg}")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Return the typed `Config` for a YAML file plus `key=value` overrides (dotted keys)."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as err:
            raise _explain(err, str(path)) from None
        if "name" not in loaded:
            cfg.name = path.stem
    overrides = [o[2:] if o.startswith("--") else o for o in overrides]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise _explain(err, "override") from None
    typed: Config = OmegaConf.to_object(cfg)
    validate(typed)
    return typed


def validate(cfg: Config) -> None:
    """Cross-field checks that a type cannot express."""
    m = cfg.model
    if m.num_scales < 1:
        raise ConfigError("model.num_scales must be at least 1")
    # Every scale but the last squeezes by 2; the last scale's checkerboard needs at least 2x2.
    if m.image_size % (2 ** (m.num_scales - 1)) or m.image_size // 2 ** (m.num_scales - 1) < 2:
        raise ConfigError(
            f"model.image_size={m.image_size} does not allow model.num_scales={m.num_scales}: it must be "
            f"divisible by 2**(num_scales-1) and leave at least 2x2 at the last scale")
    if m.checkerboard == "gathered" and (m.image_size // 2 ** (m.num_scales - 1)) % 2:
        raise ConfigError(f"model.checkerboard=gathered packs pixel pairs and needs an even width at every scale; "
                          f"model.image_size={m.image_size} leaves {m.image_size // 2 ** (m.num_scales - 1)} at the last")
    if not 0 < m.alpha < 0.5:
        raise ConfigError("model.alpha must lie in (0, 0.5)")
    if m.res_blocks < 0 or m.mid_channels < 1:
        raise ConfigError("model.res_blocks must be >= 0 and model.mid_channels >= 1")
    for check in (getattr(cfg.data, "validate", None), getattr(cfg.train, "validate", None)):
        if check is not None:
            try:
                check()
            except ValueError as err:
                raise ConfigError(str(err)) from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml(text: str) -> Config:
    """The typed config a checkpoint carries (the text `to_yaml` wrote), validated like a file."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    except OmegaConfBaseException as err:
        raise _explain(err, "stored config") from None
    typed: Config = OmegaConf.to_object(cfg)
    validate(typed)
    return typed
