"""One Tune trial: a Ray Train TorchTrainer of `resources.workers` workers running the trainer, its
reports forwarded to Tune with their checkpoints.

Why not Ray's `TuneReportCallback`: it hands Tune the metrics and a checkpoint *path*, never a Tune
checkpoint, so PBT finds nothing to clone and `Tuner.restore` nothing to resume from. Here a Ray Train
callback passes each report (metrics + the checkpoint Train persisted) through a queue to the trial's
own thread, which calls `tune.report(metrics, checkpoint=...)`; `TorchTrainer.fit` runs beside it.

Each start of a trial (first run, restart after the driver died, PBT exploit) gets a fresh trainer
out_dir, `attempt-N`: resuming from a cloned checkpoint must not mix with checkpoints a previous
attempt left at higher steps, which the trainer would prune or resume from instead.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import ray.train
from ray import tune
from ray.exceptions import RayActorError
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from nvp_dist.sweep.config import SweepConfig, override
from nvp_dist.sweep.worker import train_worker

_DONE = "done"


class TrialDiverged(RuntimeError):
    """The trainer stopped on non-finite steps; the message is the trainer's own."""


class ForwardReports(ray.train.UserCallback):
    """Runs in the Train controller: hands each report to the trial thread through a one-slot queue.

    `put` blocks while the previous report waits to be taken, and the trial thread takes report N+1
    only after `tune.report` has copied report N's checkpoint. Train registers checkpoint N+3 (and
    deletes N, keeping 3) only after this callback has handed over N+2: a checkpoint is never deleted
    while Tune is still copying it."""

    def __init__(self, reports: Queue):
        self.reports = reports

    def after_report(self, run_context, metrics: List[Dict[str, Any]], checkpoint: Optional[ray.train.Checkpoint]):
        try:
            self.reports.put((metrics[0], checkpoint))
        except RayActorError:
            # Tune stopped the trial (ASHA, or the last rung): its actor and the queue it owns are gone,
            # and this controller, which it owns too, follows. Not a training failure.
            return


def trainer_runs_dir(sweep: SweepConfig, trial_id: str) -> Path:
    """Where a trial's trainer writes (attempt-N/: checkpoints/, samples/, metrics.jsonl) and Ray Train
    keeps its copies (ray-train/)."""
    return sweep.experiment_dir / "trainer-runs" / trial_id


def _claim_attempt(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        try:
            (root / f"attempt-{n}").mkdir()
            return f"attempt-{n}"
        except FileExistsError:
            n += 1


def _explain(err: BaseException) -> BaseException:
    """TrialDiverged with the trainer's message when a worker diverged; the error itself otherwise."""
    # Imported here: unpickling the workers' failures has already loaded it (torch and all), and a trial
    # that does not fail never needs it.
    from nvp_dist.train.trainer import TrainingDiverged

    for failure in (getattr(err, "worker_failures", None) or {}).values():
        if isinstance(failure, TrainingDiverged):
            return TrialDiverged(str(failure))
    return err


def _fit(trainer: TorchTrainer, reports: Queue, outcome: Dict[str, BaseException]) -> None:
    try:
        trainer.fit()
    except BaseException as err:  # handed to the trial thread, which raises it to Tune
        outcome["error"] = err
    try:
        reports.put((_DONE, None))
    except RayActorError:
        pass  # Tune stopped the trial: nobody is left to tell


def run_trial(sampled: Dict[str, Any], sweep: SweepConfig) -> None:
    """The Tune function trainable. `sampled` maps dotted training keys to this trial's values."""
    trial_id = tune.get_context().get_trial_id()
    root = trainer_runs_dir(sweep, trial_id)
    diverged = root / "diverged.txt"
    if diverged.is_file():
        # Tune retries any failure up to max_failures; a diverged run would diverge again from its last
        # checkpoint (resume is deterministic), so a retry only repeats the reason.
        raise TrialDiverged(diverged.read_text())
    attempt = _claim_attempt(root)
    start = tune.get_checkpoint()  # a PBT clone, or this trial's own latest after a driver restart
    r = sweep.resources
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "base": sweep.base,
            "overrides": sweep.trial_overrides(sampled) + [override("train.out_dir", str(root / attempt))],
            "start": start,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=attempt, storage_path=str(root / "ray-train"), callbacks=[ForwardReports(reports)],
            # A diverged run would diverge again from its last checkpoint: fail the trial at once.
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3)),
    )
    outcome: Dict[str, BaseException] = {}
    # Daemon: when Tune stops this trial (ASHA), the actor exits and takes the controller and its
    # workers with it; nothing must wait for fit() to return.
    threading.Thread(target=_fit, args=(trainer, reports, outcome), daemon=True, name="fit").start()
    while True:
        metrics, checkpoint = reports.get()
        if metrics == _DONE:
            break
        tune_checkpoint = tune.Checkpoint(checkpoint.path, checkpoint.filesystem) if checkpoint else None
        tune.report(metrics, checkpoint=tune_checkpoint)
    if "error" in outcome:
        err = _explain(outcome["error"])
        if isinstance(err, TrialDiverged):
            diverged.write_text(str(err))
        raise err
