"""The trainer's typed configuration. Defaults follow the paper and its official code: Adam lr 1e-3,
batch 64, L2 5e-5 on weight-norm magnitudes and tanh scales, global-norm clipping at 100."""
from dataclasses import dataclass, field
from typing import Any, Dict, List

PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = ("none", "coupling", "scale", "res_block")
MEMORY = ("standard", "checkpoint", "invertible")


@dataclass
class TrainConfig:
    # Run directory: checkpoints/, samples/, metrics.jsonl, model_fp32.pt.
    out_dir: str = "runs/unnamed"
    seed: int = 0
    steps: int = 1000
    # Global batch over all ranks and accumulation steps; must divide by world size x grad_accum.
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    # The paper's L2 on weight-norm magnitudes and tanh scales only, as coefficient of sum(p^2) in the loss.
    l2: float = 5e-5
    # Global gradient-norm clipping (the official code's 100); 0 turns it off.
    grad_clip: float = 100.0
    warmup_steps: int = 0
    # Cosine decay from lr to lr * min_lr_ratio over the steps after warm-up.
    cosine: bool = False
    min_lr_ratio: float = 0.0
    # Polyak averaging of the weights (0 = off); evaluation, samples and export then use the averages.
    ema_decay: float = 0.0
    zero_stage: int = 1
    # fp32, or bf16: s/t networks in bf16; couplings' exp/log-det, batch-norm statistics, preprocessing
    # and the loss in float32.
    precision: str = "fp32"
    # torch.utils.checkpoint around each coupling (+ its batch norm), each scale, or each residual block of
    # the s/t networks. res_block also combines with memory=checkpoint|invertible: it then acts inside their
    # backward recomputation of one coupling: its transient peak then grows by one tensor per residual block
    # instead of the block's whole graph (debug model: 66 against 272 KiB a block), for one more s/t forward
    # per coupling.
    activation_checkpointing: str = "none"
    # Activation memory: standard (autograd keeps everything), checkpoint (torch.utils.checkpoint per
    # coupling: keeps coupling inputs, recomputes), invertible (keeps one output per sequence of couplings
    # and rebuilds inputs with the exact inverse in backward: memory flat in depth, about 5/3 the compute;
    # rounding-level gradient differences, see nvp_dist/flows/invertible.py). Excludes activation_checkpointing.
    memory: str = "standard"
    # Batch-norm statistics over the global batch (all ranks) rather than each rank's share. That is two
    # small collectives per batch-norm layer per step (forward and backward; 140 for the digits demo):
    # measured 1.8 ms each on gloo here, which doubles a small model's step. With false each rank
    # normalises by its own share and the running averages are averaged over ranks after every step.
    sync_bn: bool = True
    # torch.compile of each coupling's s/t network (nvp_dist/train/speed.py): compiled at the first step
    # (debug model, 2 CPU ranks: see benchmarks/RESULTS.md, "Speed options"). Not with ZeRO-3, whose
    # parameter hooks run inside the networks, nor with res_block checkpointing inside them.
    compile: bool = False
    # NHWC convolution weights and inputs in the s/t networks (the layout GPU and oneDNN kernels prefer).
    channels_last: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 500
    # Evaluate on at most this many batches per rank (0 = the whole split).
    eval_batches: int = 0
    log_every: int = 50
    samples_per_grid: int = 64
    # A non-finite loss or gradient skips the step on every rank; this many in a row stop the run.
    max_consecutive_skips: int = 10
    # Fault injection for tests: at these steps on `inject_nan_rank` (-1 = every rank) make the loss NaN
    # (inject_nan_into: loss), or only the first parameter's gradient, the loss staying finite (grad).
    inject_nan_steps: List[int] = field(default_factory=list)
    inject_nan_rank: int = -1
    inject_nan_into: str = "loss"
    # How long a collective waits for a missing rank before it raises (the process group's timeout).
    collective_timeout_s: int = 300
    # A rank whose heartbeat stops this long counts as dead and every rank exits (nvp_dist/train/watchdog.py);
    # a failing rank's exception stops the others within about a second.
    peer_timeout_s: float = 30.0
    # Test hook: send this process SIGTERM (or SIGINT, inject_signal) when evaluation reaches this batch
    # (counted from 1; 0 = never), on inject_signal_rank (-1 = every rank).
    inject_signal_at_eval_batch: int = 0
    inject_signal: str = "SIGTERM"
    inject_signal_rank: int = 0
    # ...only in the evaluation after this step (0 = every evaluation).
    inject_signal_step: int = 0
    # Raw DeepSpeed keys merged over the generated DeepSpeed config (escape hatch).
    deepspeed: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            (self.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.activation_checkpointing in CHECKPOINTING,
             f"train.activation_checkpointing must be one of {CHECKPOINTING}, got {self.activation_checkpointing!r}"),
            (self.memory in MEMORY, f"train.memory must be one of {MEMORY}, got {self.memory!r}"),
            (self.memory == "standard" or self.activation_checkpointing in ("none", "res_block"),
             f"train.memory={self.memory} and train.activation_checkpointing={self.activation_checkpointing} "
             "both choose how activations are kept: set one of them"),
            (self.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0-3, got {self.zero_stage}"),
            (not self.compile or self.zero_stage < 3,
             "train.compile needs train.zero_stage 0-2: ZeRO-3 gathers parameters in hooks inside the compiled networks"),
            (not self.compile or self.activation_checkpointing != "res_block",
             "train.compile and train.activation_checkpointing=res_block: the checkpoint wrappers sit inside "
             "the compiled s/t networks; checkpoint whole couplings or scales instead"),
            (self.batch_size > 0 and self.grad_accum > 0, "train.batch_size and train.grad_accum must be positive"),
            (self.batch_size % self.grad_accum == 0,
             f"train.batch_size={self.batch_size} does not divide by train.grad_accum={self.grad_accum}"),
            (0 <= self.ema_decay < 1, "train.ema_decay must lie in [0, 1)"),
            (self.steps > 0, "train.steps must be positive"),
            (self.checkpoint_every > 0 and self.eval_every > 0 and self.log_every > 0,
             "train.checkpoint_every, train.eval_every and train.log_every must be positive"),
            (self.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1"),
            (len(self.adam_betas) == 2, "train.adam_betas must hold two values"),
            (self.inject_nan_into in ("loss", "grad"), "train.inject_nan_into must be loss or grad"),
            (self.collective_timeout_s > 0 and self.peer_timeout_s > 0,
             "train.collective_timeout_s and train.peer_timeout_s must be positive"),
            (self.inject_signal in ("SIGTERM", "SIGINT"), "train.inject_signal must be SIGTERM or SIGINT"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
