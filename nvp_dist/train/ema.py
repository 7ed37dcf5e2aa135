"""Polyak (exponential moving) averages of the weights, used for evaluation, samples and export.

Kept as a full float32 copy on every rank, on the weights' device. Under bf16 the averages follow the
optimiser's float32 masters, not their bf16 rounding. Under ZeRO-3 the parameters (or masters) are
gathered for each update (one all-gather of the model per step): the price of exact averages of sharded
weights.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

Masters = Optional[Dict[str, torch.Tensor]]  # nvp_dist.train.masters.fp32_masters: None in fp32 training


def gathered(module: torch.nn.Module, zero_stage: int):
    """Context in which every parameter of `module` is whole (a no-op below ZeRO-3)."""
    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def full_state_dict(module: torch.nn.Module, zero_stage: int, masters: Masters = None) -> Dict[str, torch.Tensor]:
    """The module's parameters and buffers, whole and float32, on CPU. Collective under DeepSpeed.

    Parameters come from `masters`, the optimiser's float32 copy, when DeepSpeed keeps one (bf16
    training): the bf16 module weights are a rounded view of them, and evaluation, export and the resumed
    run all see the masters.
    """
    out = {name: m.detach().float().cpu().clone() for name, m in (masters or {}).items()}
    with gathered(module, zero_stage):
        for name, v in module.state_dict().items():
            if name not in out:
                out[name] = v.detach().float().cpu().clone()
    return out


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int, masters: Masters = None):
        self.decay, self.zero_stage = decay, zero_stage
        with gathered(module, zero_stage):  # kept on the weights' device: no host copy per step
            self.params = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
        for name, m in (masters or {}).items():
            self.params[name].copy_(m)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int, masters: Masters = None) -> None:
        """Moves the averages toward the current weights: `masters` for the parameters when given (bf16),
        the module's own tensors otherwise."""
        # The decay warms up ((1 + t) / (10 + t), as in TensorFlow's ExponentialMovingAverage with
        # num_updates) so early averages are not dominated by the initial weights. Running batch-norm
        # statistics are averaged with the weights: statistics copied from the live model would not match
        # the averaged weights, and a flow's likelihood in evaluation mode depends on that match.
        decay = min(self.decay, (1 + step) / (10 + step))
        masters = masters or {}
        # Masters replace the parameters, so ZeRO-3 need not gather them (only the buffers, never sharded).
        with gathered(module, self.zero_stage) if not masters else contextlib.nullcontext():
            pairs = [(self.params[name], masters[name] if name in masters else t.detach().float())
                     for name, t in list(module.named_parameters()) + list(module.named_buffers())
                     if name in self.params and self.params[name].is_floating_point()]
            averages, current = zip(*pairs)
            torch._foreach_lerp_(averages, current, 1 - decay)  # one fused call: hundreds of small tensors

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.params.items()}

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        for k, v in sd.items():
            self.params[k].copy_(v)
