"""What runs on each Ray Train worker of a trial: the same `Trainer` as `launch/train.py`, reporting every
evaluation to Ray Train.

Ray Train's TorchTrainer has already set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and built a gloo (CPU) or
nccl (GPU) process group; the trainer's `deepspeed.init_distributed` adopts that group, and Ray Train
destroys it when the worker group shuts down.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import ray.train

REPORTED_METRICS = ("bits_per_dim", "step", "images")


class EvalReporter:
    """The trainer's `on_eval`: one `ray.train.report` per evaluation, on every rank (it is a barrier).

    Rank 0 attaches the trainer's newest checkpoint when it is one not reported before. The checkpoint
    directory holds every rank's DeepSpeed shards (the trainer's out_dir is shared by all ranks), so one
    upload carries the whole state.
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.reported: Optional[str] = None
        self.reports = 0

    def __call__(self, result: Dict[str, Any]) -> None:
        self.reports += 1
        metrics = {k: result[k] for k in REPORTED_METRICS}
        newest = result.get("checkpoint")
        if not newest or newest == self.reported:
            ray.train.report(metrics)
            return
        self.reported = newest
        checkpoint = ray.train.Checkpoint.from_directory(newest) if self.rank == 0 else None
        # Named after the trainer's tag (stepNNNNNNNN): unique within a run, and readable in storage. The
        # trainer prunes its own copies, so Ray must copy rather than keep a path that may vanish.
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=Path(newest).name,
                         delete_local_checkpoint_after_upload=False)


@contextlib.contextmanager
def _resume_dir(start: Optional[ray.train.Checkpoint]) -> Iterator[str]:
    if start is None:
        yield "none"
        return
    # Local on a shared filesystem (the path itself); from cloud storage, a local copy per node. Every
    # rank reads its own shard from it.
    with start.as_directory() as path:
        yield path


def train_worker(loop_config: Dict[str, Any]) -> None:
    """`train_loop_config`: base (YAML path), overrides (dotted key=value), start (a checkpoint to resume
    from, or None)."""
    from nvp_dist.config import load_config
    from nvp_dist.train.trainer import Trainer

    cfg = load_config(loop_config["base"], loop_config["overrides"])
    rank = ray.train.get_context().get_world_rank()
    reporter = EvalReporter(rank)
    with _resume_dir(loop_config["start"]) as resume:
        trainer = Trainer(cfg, resume=resume, on_eval=reporter)
    try:
        result = trainer.train()
        if reporter.reports == 0:
            # Resumed at the last step (a PBT pause, a driver killed before Tune recorded the end): the
            # trainer evaluates once more without calling on_eval; Tune still needs that final result.
            reporter({**result, "checkpoint": trainer.last_checkpoint})
    finally:
        trainer.close()
