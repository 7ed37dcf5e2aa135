"""The trainer's typed configuration. Defaults follow the paper (Adam 1e-3, batch 64, L2 5e-5)."""
from dataclasses import dataclass, field
from typing import Any, Dict


@dataclass
class TrainConfig:
    out_dir: str = "runs/unnamed"
    seed: int = 0
    steps: int = 1000
    # Global batch (all ranks); must divide by world size x grad_accum.
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    # L2 on weight-norm magnitudes and tanh scales only (the paper's regulariser).
    l2: float = 5e-5
    grad_clip: float = 100.0
    warmup_steps: int = 0
    cosine: bool = False
    ema_decay: float = 0.0
    zero_stage: int = 1
    precision: str = "fp32"
    activation_checkpointing: str = "none"
    memory: str = "standard"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 500
    log_every: int = 50
    max_consecutive_skips: int = 10
    # Raw DeepSpeed keys merged over the generated DeepSpeed config (escape hatch).
    deepspeed: Dict[str, Any] = field(default_factory=dict)
