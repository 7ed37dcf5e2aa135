"""Ray Tune sweeps on a real local Ray (2 CPUs, no GPU), the tiny sweep on the debug model:
ASHA stops trials early and frees their workers; the best config trains with launch/train.py; a
sweep whose driver is SIGKILLed resumes without rerunning finished trials; a diverging trial fails with
the trainer's reason while the others finish.

Resources on 2 cores: two concurrent trials each take 0.1 CPU for the trial driver plus their workers'
CPUs. The ASHA test runs 2 workers x 0.45 CPU per trial (each trial a 2-rank DeepSpeed run); the
resume test runs the tiny sweep's own 1 worker x 0.9 CPU, which starts and trains faster when four
ranks would otherwise share two cores.
"""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from nvp_dist.config import load_config
from nvp_dist.sweep import load_sweep_config
from nvp_dist.sweep.runner import run_sweep
from tests.launch_helpers import explain, run_python

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SWEEP = str(ROOT / "launch" / "sweep.py")
TINY = str(ROOT / "configs" / "sweeps" / "tiny.yaml")
DEPRECATION = re.compile(r"DeprecationWarning|FutureWarning|is deprecated|DEPRECATED")
# Three trials, two at a time, no early stopping. The first (lr 1e6) diverges within three steps and
# frees its slot for the third, which starts while the second trains to its end: by the time the second
# has finished, the third is mid-run, 40 steps with a checkpoint every 5.
RESUME_ARGS = ["name=resume", "scheduler.type=fifo", "fixed.train.max_consecutive_skips=2",
               "fixed.train.steps=40", "space.train.lr.values=[1.0e6,3.0e-3,1.0e-3]",
               "space.model.mid_channels.values=[4]"]


@pytest.fixture(scope="module")
def ray_address():
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # A throwaway token in the environment: a new local Ray would otherwise write ~/.ray/auth_token.
        mp.setenv("RAY_AUTH_TOKEN", uuid.uuid4().hex)
        mp.delenv("RAY_ADDRESS", raising=False)
        context = ray.init(num_cpus=2)
        try:
            yield context.address_info["address"]
        finally:
            ray.shutdown()


def sweep_args(data: Path, storage: Path, *extra: str) -> list:
    return [f"fixed.data.path={data}", f"storage={storage}", *extra]


def wait_for_all_cpus(timeout: float = 60) -> float:
    import ray

    deadline = time.monotonic() + timeout
    while (free := ray.available_resources().get("CPU", 0.0)) < 2.0 and time.monotonic() < deadline:
        time.sleep(1)
    return free


def test_tiny_sweep_asha_stops_trials_early_and_the_best_config_trains(ray_address, digits_dir, tmp_path, capfd):
    sweep = load_sweep_config(TINY, sweep_args(digits_dir, tmp_path, "resources.workers=2",
                                               "resources.cpus_per_worker=0.45"))
    outcome = run_sweep(sweep)
    rows = {r.trial_id: r for r in outcome.rows}
    assert len(rows) == 4 and not outcome.restored
    assert {r.status for r in rows.values()} <= {"finished", "stopped"}, rows
    stopped = [r for r in rows.values() if r.status == "stopped"]
    finished = [r for r in rows.values() if r.status == "finished"]
    assert stopped and finished, rows
    # ASHA's first rung is step 5 (grace period); a stopped trial never reached the last step.
    assert all(r.steps < 20 and r.reports < 4 for r in stopped)
    assert all(r.steps == 20 and r.reports == 4 for r in finished)
    for r in finished:  # both DeepSpeed ranks of the trial ended with the same weights
        run = tmp_path / "tiny" / "trainer-runs" / r.trial_id / "attempt-0"
        assert (run / "weights_rank0.sha256").read_text() == (run / "weights_rank1.sha256").read_text()
    # Stopped trials gave their workers back: all 4 trials ran on 2 CPUs, and nothing is held now.
    assert wait_for_all_cpus() == 2.0

    with open(outcome.csv) as f:
        table = {row["trial_id"]: row for row in csv.DictReader(f)}
    assert {k: v["status"] for k, v in table.items()} == {k: r.status for k, r in rows.items()}
    best = min(finished + stopped, key=lambda r: r.best_bits_per_dim)
    assert float(table[best.trial_id]["best_bits_per_dim"]) == pytest.approx(best.best_bits_per_dim)

    cfg = load_config(outcome.best_yaml)
    assert cfg.train.lr == best.values["train.lr"] and cfg.model.mid_channels == best.values["model.mid_channels"]
    assert cfg.data.path == str(digits_dir) and cfg.train.out_dir == str(tmp_path / "tiny" / "best-run")
    proc = run_python(["--config", str(outcome.best_yaml), "train.steps=2", "train.eval_every=2",
                       "train.checkpoint_every=2"])
    assert proc.returncode == 0, explain(proc)
    assert (tmp_path / "tiny" / "best-run" / "model_fp32.pt").is_file()
    captured = capfd.readouterr()
    assert not DEPRECATION.search(captured.out + captured.err)


def trial_states(experiment: Path) -> dict:
    """trial_id -> (Tune status, whether a checkpoint is registered), as the newest experiment state a
    driver saved has them: what a restore will start from."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except ValueError:  # caught mid-write
        return {}
    out = {}
    for trial_json, runtime_json in data["trial_data"]:
        # Not last_result's checkpoint_dir_name: the driver records a result before it registers the
        # checkpoint that came with it (a separate save task), and a state saved between the two restores
        # the trial from its previous checkpoint. Tune's own loader reads the registered one.
        trial, manager = json.loads(trial_json), _TrainingRunMetadata.from_json_state(runtime_json).checkpoint_manager
        out[trial["trial_id"]] = (trial["status"], bool(manager and manager.latest_checkpoint_result))
    return out


def interrupted_mid_run(states: dict) -> bool:
    """One trial finished while another runs with a checkpoint behind it: the moment to kill the driver."""
    statuses = [status for status, _ in states.values()]
    return "TERMINATED" in statuses and any(s == "RUNNING" and ckpt for s, ckpt in states.values())


def progress_rows(experiment: Path, trial_id: str) -> int:
    (progress,) = experiment.glob(f"*_{trial_id}_*/progress.csv")
    return len(progress.read_text().splitlines()) - 1


def attempts(experiment: Path, trial_id: str) -> list:
    return sorted(p.name for p in (experiment / "trainer-runs" / trial_id).glob("attempt-*"))


def run_driver(args: list, address: str, **kwargs):
    # Tune saves its experiment state every 10 s by default; every second lets the test kill the driver
    # at a moment the saved state shows.
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    return subprocess.Popen([sys.executable, SWEEP, "--config", TINY, *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture(scope="module")
def resumed_sweep(ray_address, digits_dir, tmp_path_factory):
    """The 3-trial sweep: driver SIGKILLed once a trial has finished, then the same command again."""
    storage = tmp_path_factory.mktemp("sweeps")
    experiment = storage / "resume"
    args = sweep_args(digits_dir, storage, *RESUME_ARGS)
    first = run_driver(args, ray_address)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None and not interrupted_mid_run(trial_states(experiment)):
        time.sleep(0.5)
    assert first.poll() is None, f"the driver ended before it could be killed:\n{first.communicate()[0][-4000:]}"
    first.send_signal(signal.SIGKILL)
    first_log = first.communicate()[0]
    before = {t: status for t, (status, _) in trial_states(experiment).items()}
    done_before = {t: progress_rows(experiment, t) for t, s in before.items() if s == "TERMINATED"}
    second = run_driver(args, ray_address)
    second_log = second.communicate(timeout=400)[0]
    assert second.returncode == 0, second_log[-6000:]
    with open(experiment / "trials.csv") as f:
        rows = {row["trial_id"]: row for row in csv.DictReader(f)}
    return {"experiment": experiment, "before": before, "done_before": done_before, "rows": rows,
            "logs": first_log + second_log}


def test_killed_driver_resumes_and_finished_trials_are_not_rerun(resumed_sweep):
    experiment, before, rows = resumed_sweep["experiment"], resumed_sweep["before"], resumed_sweep["rows"]
    assert "restoring the sweep" in resumed_sweep["logs"]
    assert len(rows) == 3 and set(before) <= set(rows)  # the same trials, under the same ids
    assert resumed_sweep["done_before"], before
    for trial_id, reported in resumed_sweep["done_before"].items():
        assert rows[trial_id]["status"] == "finished"
        assert attempts(experiment, trial_id) == ["attempt-0"] and rows[trial_id]["attempts"] == "1"  # not rerun
        assert progress_rows(experiment, trial_id) == reported == int(rows[trial_id]["reports"])
    # The trial the kill interrupted went on in a fresh attempt from its last Tune checkpoint.
    (interrupted,) = [t for t, status in before.items() if status == "RUNNING"]
    assert attempts(experiment, interrupted) == ["attempt-0", "attempt-1"]
    assert rows[interrupted]["status"] == "finished" and int(rows[interrupted]["steps"]) == 40
    resumed = [json.loads(line) for line in
               (experiment / "trainer-runs" / interrupted / "attempt-1" / "metrics.jsonl").read_text().splitlines()]
    assert resumed[0]["step"] > 5, resumed[0]  # not from scratch: its first checkpoint was at step 5
    assert "resumed from" in resumed_sweep["logs"]
    assert not DEPRECATION.search(resumed_sweep["logs"])


def test_a_diverging_trial_fails_with_its_reason_and_the_others_finish(resumed_sweep):
    rows = resumed_sweep["rows"].values()
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert float(failed["train.lr"]) == 1e6
    assert "TrialDiverged" in failed["reason"] and "2 consecutive non-finite steps up to step" in failed["reason"]
    # Errored trials are not resumed either.
    assert attempts(resumed_sweep["experiment"], failed["trial_id"]) == ["attempt-0"]
    assert sorted(r["status"] for r in rows if r is not failed) == ["finished", "finished"]
    assert all(int(r["steps"]) == 40 for r in rows if r is not failed)


def test_a_preempted_trial_checkpoints_reports_and_resumes(ray_address, digits_dir, tmp_path):
    """SIGTERM reaches a trial's Ray Train worker process (the test hook signals it during the evaluation
    after step 10): the trainer, whose loop runs in a worker thread, abandons that evaluation, checkpoints,
    reports, and the trial fails as preempted; with max_failures=1 Tune starts it again from that
    checkpoint (step 10, not the step-5 one) and it finishes."""
    sweep = load_sweep_config(TINY, sweep_args(
        digits_dir, tmp_path, "name=preempt", "scheduler.type=fifo", "max_failures=1",
        "space.train.lr.values=[3.0e-3]", "space.model.mid_channels.values=[4]", "fixed.train.steps=15",
        "fixed.train.inject_signal_at_eval_batch=2", "fixed.train.inject_signal_step=10"))
    outcome = run_sweep(sweep)
    (row,) = outcome.rows
    assert row.status == "finished" and row.steps == 15, row
    experiment = tmp_path / "preempt"
    assert attempts(experiment, row.trial_id) == ["attempt-0", "attempt-1"]
    first = experiment / "trainer-runs" / row.trial_id / "attempt-0"
    assert (first / "checkpoints" / "latest").read_text().strip() == "step00000010"
    assert 10 not in [r["step"] for r in map(json.loads, (first / "metrics.jsonl").read_text().splitlines())
                      if r["event"] == "eval"]  # the abandoned evaluation reported nothing of its own
    resumed = [json.loads(line) for line in
               (experiment / "trainer-runs" / row.trial_id / "attempt-1" / "metrics.jsonl").read_text().splitlines()]
    assert resumed[0]["step"] > 10, resumed[0]
    assert wait_for_all_cpus() == 2.0
