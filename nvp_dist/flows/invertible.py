"""Invertible backprop: a sequence of coupling blocks whose backward rebuilds activations from outputs.

`InvertibleSequence` runs blocks (anything with `forward(x, cond) -> (y, logdet)` and an exact
`inverse(y, cond) -> x`, here CouplingBlocks) under no_grad and saves only the sequence's output, the
conditioning, and each FlowBatchNorm's batch statistics of this forward. Backward walks the blocks in
reverse: it rebuilds a block's input with the inverse (using those statistics, so the training-mode
inverse undoes exactly this forward), recomputes the block locally with grad enabled and running averages
frozen (they were updated once, in forward), backpropagates the output and log-det gradients, and hands the
input gradient to the block before. Parameter gradients reach `.grad` through the ordinary AccumulateGrad
path: parameters are never Function inputs (under ZeRO-3 their storage is empty outside their module's
call), and a zero-size leaf that requires grad makes autograd call backward even when the input does not.
Activation memory kept between forward and backward is then one image-sized tensor per sequence, whatever
the number of couplings or residual blocks; the transient peak in backward is one block's local graph. With
`activation_checkpointing: res_block` (nvp_dist.train.memory) that graph keeps one tensor per residual block
of the s/t network instead of its every activation, at one more s/t forward per coupling.

Contract, as with activation checkpointing: module state (train/eval mode, running averages, parameters)
must not change between a forward and its backward. Dropout masks are replayed from the RNG state saved
before each block. Parameters are only guaranteed materialised inside their own module's call (ZeRO-3
gathers there), so an inverse of a module owning parameters is routed through that module's `__call__`.

Numerical caveat. The inverse is exact in real arithmetic only. In floating point each block's inverse adds
rounding error, amplified by exp(-s) on the changed half (up to exp(c) with s = c tanh(.)), and backward
rebuilds each block from the previous rebuild, so the error compounds along a sequence (3 or 4 couplings;
never across scales: each sequence restarts from its stored output). Gradients are then those at the rebuilt
inputs. `invertible_error_report` measures both. Float32, the demo config (configs/default.yaml) trained 300
steps on digits, training mode, 8 batches of 64 per row (median, max):
  raw weights  rebuilt inputs 2.7e-7, 4.0e-7 relative; gradient against standard 2.9e-7, 4.0e-7
  EMA weights  rebuilt inputs 2.7e-7, 3.2e-7;          gradient 2.5e-7, 3.4e-7
while standard float32's own distance from a float64 gradient is 3e-6 to 3e-4 on those batches. One other
batch (EMA weights) gave 3.0e-4; float64 with 2e-7 noise added to the rebuilt inputs gives the same 3.0e-4,
so that is the gradient's own sensitivity at that batch, not the method. Growth with the bound c (every
coupling's tanh scale set to c on that model): c <= 2: 5e-7 rebuilt, 3e-7 gradient; c = 4: 2e-4 and 2e-6;
c = 8: the rebuild fails (error 1e2, gradient 0.5 off). That model learned c = 1.2 in its channel-wise
couplings (its checkerboard ones were still at their initial 0: it was trained before the fix that lets them
learn, see AffineCoupling). Check a model whose scales grow past about 3 with the report, or train it
with `standard` or `checkpoint`. Float64 agrees with standard to about 1e-15.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nvp_dist.flows.batchnorm import FlowBatchNorm, frozen_running_stats
from nvp_dist.flows.realnvp import CouplingBlock, Scale, log_standard_normal
from nvp_dist.flows.squeeze import squeeze, squeeze_ordered, unsqueeze

# Set by invertible_error_report: called as probe(block, reconstructed_input) during backward.
_probe: Callable[[nn.Module, torch.Tensor], None] | None = None


def _norms(block: nn.Module) -> list[FlowBatchNorm]:
    return [m for m in block.modules() if isinstance(m, FlowBatchNorm)]


def _batch_stats(block: nn.Module) -> list[torch.Tensor]:
    """The statistics a training-mode FlowBatchNorm used in the forward just run (evaluation mode uses
    running averages, which stay put until the optimiser step)."""
    stats = []
    for norm in _norms(block):
        if norm.training:
            stats += [norm.last_mean, norm.last_var]
    return stats


@contextlib.contextmanager
def _forward_statistics(block: nn.Module, stats: Sequence[torch.Tensor]):
    """Make the block's inverse use this forward's batch statistics; leave them as the forward left them
    (the recomputation overwrites them with statistics of the reconstructed input)."""
    norms = [n for n in _norms(block) if n.training]

    def put():
        for i, norm in enumerate(norms):
            norm.last_mean, norm.last_var = stats[2 * i], stats[2 * i + 1]

    put()
    try:
        yield
    finally:
        put()


@contextlib.contextmanager
def _inverse_through_call(block: nn.Module):
    """Route `inverse` of every module owning parameters through its `__call__`, so that hooks which
    materialise parameters around a module's forward (ZeRO-3's gather) run for the inverse too."""
    patched = []
    for m in block.modules():
        if callable(getattr(type(m), "inverse", None)) and next(m.parameters(recurse=False), None) is not None:
            def inverse(*args, _m=m, **kwargs):
                shadowed = _m.__dict__.get("forward")
                _m.forward = functools.partial(type(_m).inverse, _m)
                try:
                    return _m(*args, **kwargs)
                finally:
                    if shadowed is None:
                        del _m.forward
                    else:
                        _m.forward = shadowed
            m.inverse = inverse
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.inverse


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _replayed_rng(state, device: torch.device):
    """The RNG as it was before the block's forward (dropout draws the same masks); restored after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _invert(block, y, cond, stats, rng):
    with torch.no_grad(), frozen_running_stats(block), _forward_statistics(block, stats), \
            _replayed_rng(rng, y.device), _inverse_through_call(block):
        return block.inverse(y, cond)


class InvertibleSequence(torch.autograd.Function):
    """apply(blocks, cond, x, leaf) -> (y, logdet); `leaf` is a zero-size tensor requiring grad."""

    @staticmethod
    def forward(ctx, blocks, cond, x, leaf):
        h, logdet, stats, rngs = x, x.new_zeros(x.shape[0]), [], []
        with torch.no_grad():
            for block in blocks:
                rngs.append(_rng_state(h.device))
                h, ld = block(h, cond)
                logdet = logdet + ld
                stats.append(_batch_stats(block))
        ctx.blocks, ctx.rngs, ctx.has_cond = blocks, rngs, cond is not None
        ctx.n_stats = [len(s) for s in stats]
        ctx.save_for_backward(h, *([cond] if cond is not None else []), *[t for s in stats for t in s])
        return h, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        y, *rest = ctx.saved_tensors
        cond = rest.pop(0) if ctx.has_cond else None
        stats, i = [], 0
        for n in ctx.n_stats:
            stats.append(rest[i:i + n])
            i += n
        want_cond = ctx.needs_input_grad[1]
        cond_leaf = cond.detach().requires_grad_() if want_cond else cond
        for block, st, rng in reversed(list(zip(ctx.blocks, stats, ctx.rngs))):
            x = _invert(block, y, cond, st, rng).detach().requires_grad_()
            if _probe is not None:
                _probe(block, x.detach())
            # Backward inside the same context: activation checkpoints within the block (res_block) recompute
            # during it and must see the same frozen running averages and statistics as the forward above.
            with torch.enable_grad(), frozen_running_stats(block), _forward_statistics(block, st), \
                    _replayed_rng(rng, x.device):
                y_re, ld_re = block(x, cond_leaf)
                pairs = [(o, g) for o, g in ((y_re, grad_y), (ld_re, grad_logdet)) if o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            grad_y, y = x.grad, x.detach()
            del x, y_re, ld_re, pairs  # free this block's graph before the next one is built
        return None, (cond_leaf.grad if want_cond else None), grad_y, None


def invertible_sequence(blocks: Sequence[nn.Module], x: torch.Tensor, cond: torch.Tensor | None = None):
    """(y, logdet) of the blocks applied in order, with invertible backprop when a gradient is wanted."""
    blocks = list(blocks)
    wants_grad = torch.is_grad_enabled() and (
        x.requires_grad or (cond is not None and cond.requires_grad)
        or any(p.requires_grad for b in blocks for p in b.parameters()))
    if not blocks or not wants_grad:
        logdet = x.new_zeros(x.shape[0])
        for block in blocks:
            x, ld = block(x, cond)
            logdet = logdet + ld
        return x, logdet
    leaf = torch.empty(0, device=x.device, requires_grad=True)
    return InvertibleSequence.apply(blocks, cond, x, leaf)


def invertible_scale_forward(scale: Scale, h: torch.Tensor, cond: torch.Tensor | None = None):
    """Scale.forward with its checkerboard and channel-wise sequences through `invertible_sequence`; the
    squeeze permutations between them stay ordinary autograd (they save nothing)."""
    h, logdet = invertible_sequence(scale.checker, h, cond)
    if scale.last:
        return None, h, logdet
    h, ld = invertible_sequence(scale.channel, squeeze(h), cond)
    h_next, z = squeeze_ordered(unsqueeze(h)).chunk(2, dim=1)
    return h_next, z, logdet + ld


def use_invertible_backprop(model: nn.Module) -> int:
    """Replace `forward` on every Scale instance of the model; returns how many. An instance attribute
    shadows the class's forward, so state-dict keys, and hence checkpoints, are unchanged."""
    scales = [m for m in model.modules() if isinstance(m, Scale)]
    for scale in scales:
        if "forward" in scale.__dict__:
            raise RuntimeError("a Scale's forward is already replaced (activation checkpointing?): "
                               "invertible backprop replaces it itself")
        scale.forward = functools.partial(invertible_scale_forward, scale)
    return len(scales)


def _nll_grads(model, y, cond, seed) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the same dropout masks in both copies
    zs, logdet = model(y, cond)
    loss = -(log_standard_normal(zs) + logdet).mean()
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.detach().clone() for n, p in model.named_parameters()
                                      if p.grad is not None}}


def invertible_error_report(model: nn.Module, y: torch.Tensor, cond: torch.Tensor | None = None,
                            seed: int = 0) -> dict:
    """How far invertible backprop is from standard backprop for this model on one batch (y in logit
    space), both run on copies in the model's current mode:
      reconstruction_max_rel  max over blocks of max|x_rebuilt - x| / max|x|, x the block's true input;
      reconstruction_per_block  that figure per block, in model order;
      grad_rel                ||g_inv - g_std|| / ||g_std|| over all parameters together;
      grad_max_param_rel      the largest per-tensor ||g_inv - g_std|| / ||g_std||, over the parameter
                              tensors holding at least 1e-3 of the gradient's norm;
      loss_rel                relative difference of the loss (the same forward: about rounding).
    The loss is the negative log-likelihood in nats per example (preprocessing terms omitted)."""
    global _probe
    std, inv = copy.deepcopy(model), copy.deepcopy(model)
    use_invertible_backprop(inv)
    g_std = _nll_grads(std, y, cond, seed)
    order = [m for m in inv.modules() if isinstance(m, CouplingBlock)]
    true_in: dict[nn.Module, torch.Tensor] = {}

    def record(block, args):  # the first call is the true forward; later ones are backward's recomputation
        if block not in true_in:
            true_in[block] = args[0].detach().clone()

    hooks = [b.register_forward_pre_hook(record) for b in order]
    errors: dict[nn.Module, float] = {}

    def probe(block, x):
        ref = true_in[block]
        errors[block] = ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    _probe = probe
    try:
        g_inv = _nll_grads(inv, y, cond, seed)
    finally:
        _probe = None
        for h in hooks:
            h.remove()
    names = [n for n in g_std if n != "loss"]
    diff = torch.sqrt(sum(((g_inv[n] - g_std[n]).double() ** 2).sum() for n in names))
    norm = torch.sqrt(sum((g_std[n].double() ** 2).sum() for n in names))
    # Tensors with a negligible share of the gradient are left out of the per-tensor figure: conv biases
    # feeding a batch norm have an exactly zero gradient, which both paths compute as rounding noise.
    per_param = [((g_inv[n] - g_std[n]).norm() / g_std[n].norm()).item() for n in names
                 if g_std[n].norm() >= 1e-3 * norm]
    per_block = [errors[b] for b in order if b in errors]
    return {
        "reconstruction_max_rel": max(per_block),
        "reconstruction_per_block": per_block,
        "grad_rel": (diff / norm).item(),
        "grad_max_param_rel": max(per_param),
        "loss_rel": ((g_inv["loss"] - g_std["loss"]).abs() / g_std["loss"].abs()).item(),
    }
