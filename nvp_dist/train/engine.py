"""The DeepSpeed engine: its config generated from the typed training config, the paper's optimiser.

The optimiser is torch's Adam (DeepSpeed's own would JIT-compile a CPU kernel for minutes). The paper's
L2 penalty c * sum(p^2) on weight-norm magnitudes and tanh scales is applied as Adam's coupled weight
decay 2c on exactly those parameters: the same gradient, without gathering ZeRO-3 partitions into the
loss. It is added after clipping, where the official code clips it with the rest (a 5e-5-sized term).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch

from nvp_dist.config import Config


class GuardedAdam(torch.optim.Adam):
    """Adam whose next step can be cancelled by the trainer's non-finite guard.

    DeepSpeed's own overflow skip depends on stage and dtype (ZeRO-3 and bf16 do not skip), so the guard
    decides on every rank alike and this leaves weights and moments untouched on a skipped step.
    """

    skip_next = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_next:
            return None
        return super().step(closure)


# ZeRO's buffers on CPU, in elements. DeepSpeed's defaults (reduce and all-gather buckets 5e8, stage-3
# prefetch 5e7, live parameters 1e9) are sized for GPU interconnects, and the pages a bucket touches stay in
# RSS: at 64x64 (94.4M parameters, 2 ranks, batch 16) they put stage 2 at 2080 MiB a rank and stage 3 at
# 2496 (stage 0: 2211), against 1722 and 1816 with these (benchmarks/RESULTS.md, "ZeRO stages").
# train.deepspeed overrides them; on CUDA DeepSpeed's own stand.
CPU_ZERO_BUFFERS = {"reduce_bucket_size": 10**7, "allgather_bucket_size": 10**7,
                    "stage3_prefetch_bucket_size": 5 * 10**6, "stage3_max_live_parameters": 10**7}


def deepspeed_config(cfg: Config, world_size: int, cuda: bool = False) -> Dict[str, Any]:
    t = cfg.train
    if t.batch_size % (world_size * t.grad_accum):
        raise ValueError(f"train.batch_size={t.batch_size} does not divide by world size {world_size} x "
                         f"train.grad_accum={t.grad_accum}")
    ds: Dict[str, Any] = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // (world_size * t.grad_accum),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage, **({} if cuda else CPU_ZERO_BUFFERS)},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own step log would interleave
        "wall_clock_breakdown": False,
        # GuardedAdam is torch's Adam plus a skip switch; DeepSpeed only whitelists the exact classes.
        "zero_allow_untested_optimizer": True,
    }
    return _merge(ds, dict(t.deepspeed))


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def param_groups(model, l2: float):
    regularised = {id(p) for p in model.l2_parameters()}
    decay = [p for p in model.parameters() if id(p) in regularised]
    rest = [p for p in model.parameters() if id(p) not in regularised]
    return [{"params": decay, "weight_decay": 2 * l2}, {"params": rest, "weight_decay": 0.0}]


def lr_lambda(cfg: Config):
    t = cfg.train

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if not t.cosine:
            return 1.0
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_engine(model, cfg: Config, world_size: int):
    """deepspeed.initialize with the generated config; returns (engine, optimizer, scheduler)."""
    import deepspeed

    t = cfg.train
    # fused: torch's default is its per-tensor loop on CPU; on the demo's 380 parameters (no ZeRO flat
    # partition) one Adam step measured 17.6 ms per-tensor, 11.8 foreach, 4.0 fused (1 thread, idle).
    optimizer = GuardedAdam(param_groups(model, t.l2), lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                            fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, ds_opt, _, ds_sched = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, cuda=next(model.parameters()).is_cuda))
    keep_flow_state_float32(engine.module)
    return engine, optimizer, ds_sched


def keep_flow_state_float32(module: torch.nn.Module) -> None:
    """DeepSpeed's bf16 mode casts every buffer; running batch-norm statistics stay float32 (the flow's
    enter the likelihood's log-determinant directly)."""
    from nvp_dist.flows.batchnorm import FlowBatchNorm, StatBatchNorm2d

    for m in module.modules():
        if isinstance(m, (FlowBatchNorm, StatBatchNorm2d)):
            m.running_mean.data = m.running_mean.data.float()
            m.running_var.data = m.running_var.data.float()
