"""Activation memory policies, applied to a built model from outside (the model code knows nothing of them).

`activation_checkpointing: coupling | scale` wraps each CouplingBlock (a coupling and its batch norm) or
each Scale in non-reentrant torch.utils.checkpoint: only its input is kept, and backward recomputes it.
The recomputation runs with running batch-norm averages frozen, so each step still updates them once.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from nvp_dist.flows import CouplingBlock, Scale
from nvp_dist.flows.batchnorm import frozen_running_stats


def _checkpointed(module: torch.nn.Module):
    inner = module.forward

    def forward(*args, **kwargs):
        calls = []

        def run(*a, **k):
            if calls:  # backward's recomputation: the statistics of this batch were already counted
                with frozen_running_stats(module):
                    return inner(*a, **k)
            calls.append(1)
            return inner(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> int:
    """Wrap the chosen units in place; returns how many were wrapped."""
    if mode == "none":
        return 0
    unit = {"coupling": CouplingBlock, "scale": Scale}[mode]
    wrapped = 0
    for m in model.modules():
        if isinstance(m, unit):
            # An instance attribute shadows the class's forward; state-dict keys are unchanged, so
            # checkpoints move freely between memory modes.
            m.forward = _checkpointed(m)
            wrapped += 1
    return wrapped
