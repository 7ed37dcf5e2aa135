"""What runs on each Ray Train worker of a trial: the same `Trainer` as `launch/train.py`, reporting every
evaluation to Ray Train.

Ray Train's TorchTrainer has already set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and built a gloo (CPU) or
nccl (GPU) process group; the trainer's `deepspeed.init_distributed` adopts that group, and Ray Train
destroys it when the worker group shuts down.

Preemption: this function runs in a thread of the Train worker actor, where the trainer cannot install
signal handlers (CPython allows them in the main thread only). The actor is a plain synchronous one, so
its tasks run in the process's main thread: a task sent to our own actor installs a SIGTERM handler there
that sets the trainer's stop flag (replacing Ray's, which would exit the process at once). The trainer then
abandons an evaluation, checkpoints and stops; this worker reports that checkpoint (with the last
completed evaluation's metrics) and raises TrialPreempted, and the sweep's `max_failures` lets Tune start
the trial again from it. A second SIGTERM exits at once, as Ray's handler did.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import ray.train

REPORTED_METRICS = ("bits_per_dim", "step", "images")
log = logging.getLogger("nvp_dist.sweep")


class TrialPreempted(RuntimeError):
    """The trainer stopped on SIGTERM after a checkpoint; the trial is worth resuming from it."""


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
        self.last: Optional[Dict[str, Any]] = None

    def __call__(self, result: Dict[str, Any]) -> None:
        self.reports += 1
        self.last = result
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
    _stop_on_sigterm(trainer)
    try:
        result = trainer.train()
        if reporter.reports == 0:
            # Resumed at the last step (a PBT pause, a driver killed before Tune recorded the end): the
            # trainer evaluates once more without calling on_eval; Tune still needs that final result.
            reporter({**result, "checkpoint": trainer.last_checkpoint})
    except SystemExit as stop:
        from nvp_dist.train.failures import EXIT_STOPPED

        if stop.code != EXIT_STOPPED:
            raise
        if reporter.last is not None:  # a report needs a metric: the last completed evaluation's
            reporter({**reporter.last, "checkpoint": trainer.last_checkpoint})
        raise TrialPreempted(f"stopped by a termination signal at step {trainer.step} after checkpoint "
                             f"{trainer.last_checkpoint}") from None
    finally:
        # Ray Train supervises the worker group (it ends every worker when one fails): the trainer's
        # watchdog must not outlive the run, or count rank 0's departure at the end as a failure.
        from nvp_dist.train import watchdog

        watchdog.finished()
        trainer.close()


# The trainer of this worker process, for the SIGTERM handler (the task that installs it is pickled, so it
# refers to the trainer through this module rather than capturing it).
_trainer = None


def _stop_on_sigterm(trainer) -> None:
    """Route this process's SIGTERM to `trainer.request_stop` (see the module docstring)."""
    import ray

    global _trainer
    _trainer = trainer
    ray.get(ray.get_runtime_context().current_actor.__ray_call__.remote(_install_sigterm_handler))


def _install_sigterm_handler(_actor) -> None:
    # Runs in the worker process's main thread, as a task of its own (synchronous) actor.
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if _trainer is None or _trainer.stop_requested:  # a second one: leave now, as Ray's handler would
            if callable(previous):
                previous(signum, frame)
            os._exit(128 + signum)
        log.warning("SIGTERM in Ray worker: the trainer stops after a checkpoint")
        _trainer.request_stop(signum)

    signal.signal(signal.SIGTERM, on_sigterm)
