"""Speed options applied to a built model from outside (the flows know nothing of them), before DeepSpeed.

`train.compile` compiles each coupling's s/t network (STNetwork) with torch.compile, in place
(`nn.Module.compile`: state-dict keys unchanged, checkpoints move freely between the modes). Only the s/t
networks: they hold almost all the FLOPs, and the couplings' exp/log-det and masks stay eager, exactly as
written. Compilation is lazy (first forward) and each new batch shape (evaluation's last batch) compiles
once more. Evaluation's inference copy stays eager.

`train.channels_last` hands each s/t network its input in NHWC, the layout cuDNN's and oneDNN's convolution
kernels prefer (this CPU: fp32 3x3 convolutions 92 against 77 GFLOP/s per thread, STACK_NOTES); a
convolution with an NHWC input runs and returns NHWC, so the layout carries through the network. The
parameters stay contiguous: DeepSpeed's start-up broadcast views each as bytes (which needs a unit last
stride) and ZeRO flattens them anyway, and the weight-normalised weight is computed afresh each forward.

Adam is torch's fused kernel on CPU and CUDA alike (nvp_dist/train/engine.py): on CUDA one launch per
parameter group instead of a loop over hundreds of small tensors.
"""
from __future__ import annotations

import torch

from nvp_dist.flows.resnet import STNetwork


def _to_channels_last(module: torch.nn.Module, args):
    x, *rest = args
    return (x.contiguous(memory_format=torch.channels_last), *rest)


def apply_speed_options(model: torch.nn.Module, compile: bool = False, channels_last: bool = False,
                        backend: str = "inductor") -> int:
    """Apply `train.compile` / `train.channels_last` to every s/t network in place; returns how many.
    `backend` is torch.compile's (benchmarks/device_check.py's dry run traces with "eager")."""
    nets = [m for m in model.modules() if isinstance(m, STNetwork)]
    if compile:
        import torch._dynamo

        # Dynamo counts recompilations per code object, and every STNetwork shares one forward: each
        # instance, shape, and grad mode (the invertible mode's no-grad passes) is one more. Past the default
        # limit of 8 the rest silently ran eager (seen on the debug model's 10 networks).
        # torch 2.7 renamed cache_size_limit to recompile_limit (the old names remain as aliases there, but
        # pyproject's floor, torch 2.6, has only the old ones): set whichever this torch has.
        cfg = torch._dynamo.config
        for new, old, want in (("recompile_limit", "cache_size_limit", 8 * len(nets)),
                               ("accumulated_recompile_limit", "accumulated_cache_size_limit", 16 * len(nets))):
            name = new if hasattr(cfg, new) else old
            setattr(cfg, name, max(getattr(cfg, name), want))
    for net in nets:
        if channels_last:
            net.register_forward_pre_hook(_to_channels_last)
        if compile:
            net.compile(backend=backend)
    return len(nets)
