"""The float32 master weights DeepSpeed keeps under bf16, whole, at every ZeRO stage.

Under bf16 the module's weights are a rounded view of the optimiser's float32 masters; EMA, evaluation,
export and the consolidated state read the masters. DeepSpeed's `safe_get_full_fp32_param` finds them
under ZeRO 1-3 only: without ZeRO, bf16 gets DeepSpeed's unfused fp16 wrapper (bf16 as its low precision),
whose masters sit in `fp32_groups` beside `fp16_groups` and are not linked to the parameters. It also
costs one all-reduce per parameter (hundreds a step for the EMA), so stages 1-2 here fill one flat buffer
with each rank's fragments and reduce it once.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

# The checkpoint key under which DeepSpeed's unfused wrapper saves its masters (ZeRO 0, bf16), inside the
# engine's `optimizer` entry of mp_rank_00_model_states.pt.
SAVED_MASTERS_KEY = "fp32_groups"


@torch.no_grad()
def fp32_masters(module: torch.nn.Module, optimizer) -> Optional[Dict[str, torch.Tensor]]:
    """{parameter name: whole float32 master} on the weights' device, or None when the module's weights are
    float32 themselves (they are then the masters). Views, not copies. Collective under ZeRO 1-3: call it
    on every rank."""
    params = list(module.named_parameters())
    if all(p.dtype == torch.float32 for _, p in params):
        return None
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, SAVED_MASTERS_KEY):  # ZeRO 0
        pairs = {id(lp): hp for lps, hps in zip(optimizer.fp16_groups, getattr(optimizer, SAVED_MASTERS_KEY))
                 for lp, hp in zip(lps, hps)}
        missing = [name for name, p in params if id(p) not in pairs]
        if missing:
            raise RuntimeError(f"the bf16 optimiser keeps no float32 master for {missing[:3]}")
        return {name: pairs[id(p)].view_as(p) for name, p in params}
    if all(hasattr(p, "ds_id") for _, p in params):  # ZeRO 3: its own gather, per parameter
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(p) for name, p in params}
    if all(hasattr(p, "_hp_mapping") for _, p in params):  # ZeRO 1-2: each rank owns fragments
        return _reduce_fragments(params)
    raise RuntimeError(f"cannot find the float32 masters of {type(optimizer).__name__}")


def _reduce_fragments(params: List[Tuple[str, torch.nn.Parameter]]) -> Dict[str, torch.Tensor]:
    import deepspeed.comm as dist

    sizes = [p.numel() for _, p in params]
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0][1].device)
    pieces = flat.split(sizes)
    for (_, p), piece in zip(params, pieces):
        mapping = p._hp_mapping  # None on a rank that owns no part of this parameter
        if mapping is not None:
            address = mapping.lp_fragment_address
            piece.narrow(0, address.start, address.numel).copy_(mapping.get_hp_fragment().detach())
    # Every element is owned by exactly one rank, the others contribute zeros: the sum is the whole.
    dist.all_reduce(flat, group=params[0][1]._dp_group)
    return {name: piece.view_as(p) for (name, p), piece in zip(params, pieces)}


def saved_masters(model_states: dict, names_in_groups: List[List[str]]) -> Optional[Dict[str, torch.Tensor]]:
    """The masters a ZeRO-0 bf16 checkpoint saved, by name, from mp_rank_00_model_states.pt's contents;
    `names_in_groups` are the parameter names of the optimiser's non-empty groups, in order. None when the
    checkpoint has none (fp32: the module entry holds the weights)."""
    optimizer = model_states.get("optimizer") or {}
    groups = optimizer.get(SAVED_MASTERS_KEY)
    if groups is None:
        return None
    if [len(g) for g in groups] != [len(n) for n in names_in_groups]:
        raise RuntimeError("the checkpoint's optimiser groups do not match the model's parameter groups")
    return {name: t.float() for names, group in zip(names_in_groups, groups) for name, t in zip(names, group)}
