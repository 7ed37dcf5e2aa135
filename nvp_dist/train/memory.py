"""Activation memory policies, applied to a built model from outside (the model code knows nothing of them).

`activation_checkpointing: coupling | scale | res_block` wraps each CouplingBlock (a coupling and its batch
norm), each Scale, or each ResidualBlock of the s/t networks in non-reentrant torch.utils.checkpoint: only
its input is kept, and backward recomputes it. Checkpointing is inert under no_grad, so res_block combined
with `memory: checkpoint | invertible` acts where those modes rebuild a coupling's graph in backward.
The recomputation runs on throw-away copies of the running batch-norm averages as the forward found them,
so it repeats the forward exactly and each step still updates the real ones once.

`memory: standard | checkpoint | invertible` is the trainer's choice among them: `checkpoint` is the
per-coupling checkpointing above; `invertible` runs each Scale's checkerboard and channel-wise sequences
through nvp_dist.flows.invertible, which keeps only each sequence's output and rebuilds the rest in backward
with the exact inverse (numerical caveat and measurements in that module).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from nvp_dist.flows import CouplingBlock, Scale
from nvp_dist.flows.batchnorm import FlowBatchNorm, StatBatchNorm2d
from nvp_dist.flows.invertible import use_invertible_backprop
from nvp_dist.flows.resnet import ResidualBlock

MEMORY_MODES = ("standard", "checkpoint", "invertible")


def _running_stats(module: torch.nn.Module):
    """Copies of the batch-norm layers' running buffers: [(layer, buffer name, copy)]."""
    return [(m, name, buf.clone()) for m in module.modules() if isinstance(m, (FlowBatchNorm, StatBatchNorm2d))
            for name, buf in m.named_buffers(recurse=False)]


@contextlib.contextmanager
def _running_stats_as(snapshot):
    """Run with throw-away copies of `snapshot` as the running buffers, then put the real ones back. Not
    frozen_running_stats: freezing makes F.batch_norm run without running buffers, which saves two fewer
    tensors for backward, and non-reentrant checkpointing matches the recomputation's saved tensors to the
    forward's by position; and with synchronised statistics the running mean is the moments' shift, so
    the copies must hold the values the forward started from for the recomputation to repeat it exactly."""
    real = [(m, name, getattr(m, name)) for m, name, _ in snapshot]
    for m, name, copy in snapshot:
        setattr(m, name, copy.clone())
    try:
        yield
    finally:
        for m, name, buf in real:
            setattr(m, name, buf)


def _checkpointed(module: torch.nn.Module):
    inner = module.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing to save or recompute: evaluation, invertible's no-grad passes
            return inner(*args, **kwargs)
        started_from = []

        def run(*a, **k):
            if started_from:  # backward's recomputation: the statistics of this batch were already counted
                with _running_stats_as(started_from[0]):
                    return inner(*a, **k)
            started_from.append(_running_stats(module))
            return inner(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> int:
    """Wrap the chosen units in place; returns how many were wrapped."""
    if mode == "none":
        return 0
    unit = {"coupling": CouplingBlock, "scale": Scale, "res_block": ResidualBlock}[mode]
    wrapped = 0
    for m in model.modules():
        if isinstance(m, unit):
            # An instance attribute shadows the class's forward; state-dict keys are unchanged, so
            # checkpoints move freely between memory modes.
            m.forward = _checkpointed(m)
            wrapped += 1
    return wrapped


def apply_memory_policy(model: torch.nn.Module, memory: str, checkpointing: str = "none") -> None:
    """The trainer's `train.memory` and `train.activation_checkpointing`, in the one order that composes:
    checkpoint wrappers first, so that `invertible` (which replaces each Scale's forward) runs the wrapped
    residual blocks in its recomputation."""
    apply_activation_checkpointing(model, checkpointing)
    apply_memory_mode(model, memory)


def apply_memory_mode(model: torch.nn.Module, mode: str) -> int:
    """Apply `memory: standard | checkpoint | invertible` in place; returns how many units were wrapped
    (CouplingBlocks for checkpoint, Scales for invertible). Either replaces `forward` on instances, so
    state-dict keys and checkpoints are the same in every mode."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {mode!r}")
    if mode == "standard":
        return 0
    if mode == "checkpoint":
        return apply_activation_checkpointing(model, "coupling")
    return use_invertible_backprop(model)
