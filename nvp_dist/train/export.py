"""Consolidated float32 models: exported from any checkpoint (any ZeRO stage) for one-device use.

`load_inference_model(path)` accepts an exported `.pt` file, a checkpoint tag directory, a `checkpoints/`
directory or a run directory (then `latest`), and returns the model in evaluation mode with its config
and step, using the Polyak (EMA) weights when the run kept them.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from nvp_dist.config import Config, config_from_yaml
from nvp_dist.data.manifest import runs_a_command
from nvp_dist.flows import RealNVP
from nvp_dist.train import safe_load
from nvp_dist.train.checkpoint import FORMAT_VERSION, checkpoint_tags, log, newest_valid, read_nvp_state, verify
from nvp_dist.train.engine import param_groups
from nvp_dist.train.masters import saved_masters


def resolve_tag_dir(path: Path) -> Path:
    """A run dir, a checkpoints dir or a tag dir -> a tag dir whose manifest verifies. From a run or
    checkpoints dir: `latest`, or the newest complete checkpoint when that one is damaged (as `--resume
    auto` does); a tag dir given itself must verify. RuntimeError naming what is wrong otherwise."""
    if (path / "nvp_state.pt").is_file() or (path / "MANIFEST.json").is_file():
        problem = verify(path)
        if problem is not None:
            raise RuntimeError(f"{path} is not a complete checkpoint: {problem}")
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file() or checkpoint_tags(root):
            if latest.is_file():
                named = root / latest.read_text().strip()
                problem = verify(named)
                if problem is None:
                    return named
                log.warning("%s names %s, which is not usable (%s): falling back to an older checkpoint",
                            latest, named, problem)
            tag = newest_valid(root)
            if tag is None:
                raise RuntimeError(f"no complete checkpoint under {root} (each lacks or fails its MANIFEST.json)")
            return root / tag
    raise FileNotFoundError(f"{path} is neither a checkpoint, a checkpoints directory nor a run directory")


def consolidated_state_dict(tag_dir: Path, cfg: Config) -> Dict[str, torch.Tensor]:
    """The engine's weights (float32 masters under bf16) and buffers, whole and float32, read from the
    per-rank files on CPU."""
    # DeepSpeed's reader below uses the full unpickler: only files that pass the restricted one reach it.
    safe_load.check_deepspeed_files(tag_dir)
    if cfg.train.zero_stage == 0:
        states = safe_load.load(tag_dir / "mp_rank_00_model_states.pt", allow=safe_load.deepspeed_globals())
        sd = {k: v.float() for k, v in states["module"].items()}
        # bf16: the module entry is the masters' bf16 rounding; ZeRO 1-3 checkpoints give masters below.
        sd.update(saved_masters(states, optimizer_group_names(cfg)) or {})
        return sd
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file it reads
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.float() for k, v in sd.items()}


def optimizer_group_names(cfg: Config) -> List[List[str]]:
    """The parameter names of the engine's optimiser groups, in its order (DeepSpeed drops empty groups);
    built on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        model = RealNVP(cfg.model)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(model, cfg.train.l2)]
    return [g for g in groups if g]


def export_fp32(tag_dir: Path, out: Path) -> Path:
    problem = verify(tag_dir)
    if problem is not None:
        raise RuntimeError(f"cannot export {tag_dir}: {problem}")
    state = read_nvp_state(tag_dir)
    cfg = config_from_yaml(state["config"])
    payload = {
        "format_version": FORMAT_VERSION, "config": state["config"], "step": state["step"],
        "model": consolidated_state_dict(tag_dir, cfg), "ema": state.get("ema"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)
    return out


def load_inference_model(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                         config: Optional[Config] = None) -> Tuple[RealNVP, Config, int]:
    path = Path(path)
    if path.is_file():
        payload = safe_load.load(path)
        if payload.get("format_version", 0) > FORMAT_VERSION:
            raise RuntimeError(f"{path} has format {payload['format_version']}; this nvp-dist reads up to {FORMAT_VERSION}")
        cfg_text, step, weights, ema = payload["config"], payload["step"], payload["model"], payload.get("ema")
    else:
        tag_dir = resolve_tag_dir(path)
        state = read_nvp_state(tag_dir)
        cfg_text, step, ema = state["config"], state["step"], state.get("ema")
        weights = consolidated_state_dict(tag_dir, config_from_yaml(cfg_text))
    cfg = config_from_yaml(cfg_text)
    if config is None and runs_a_command(cfg.data.path):
        raise ValueError(f"{path} was trained on data.path={cfg.data.path}, which runs a shell command; a model "
                         "file cannot opt in to that: pass --config with data.allow_shell_paths=true")
    if config is not None:
        if OmegaConf.structured(config.model) != OmegaConf.structured(cfg.model):
            raise ValueError(f"the model section of the given config differs from the one {path} was trained with")
        cfg = config
    model = RealNVP(cfg.model)
    model.load_state_dict(ema if (use_ema and ema) else weights)
    return model.to(device).eval(), cfg, step

