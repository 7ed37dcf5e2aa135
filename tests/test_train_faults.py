"""A rank killed with SIGKILL takes the whole job down quickly, and `--resume auto` continues it."""
import os
import signal
import subprocess
import time

import psutil

from tests.launch_helpers import ROOT, debug_args, deepspeed_cmd, explain, run_deepspeed, train_env


def _rank_process(launcher: psutil.Process, rank: int, deadline: float) -> psutil.Process:
    while time.time() < deadline:
        for p in launcher.children(recursive=True):
            try:
                if f"--local_rank={rank}" in " ".join(p.cmdline()):
                    return p
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.5)
    raise AssertionError(f"no rank {rank} process under the launcher")


def test_sigkill_of_one_rank_ends_the_job_and_resume_continues(digits_dir, tmp_path):
    out = tmp_path / "run"
    args = debug_args(digits_dir, out, "train.steps=100000", "train.checkpoint_every=5", "train.eval_every=100000",
                      "train.log_every=5")
    job = subprocess.Popen(deepspeed_cmd(args), env=train_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        latest = out / "checkpoints" / "latest"
        while not latest.exists() and time.time() < deadline and job.poll() is None:
            time.sleep(0.5)
        assert latest.exists(), job.stdout.read() if job.poll() is not None else "no checkpoint in time"
        victim = _rank_process(psutil.Process(job.pid), 1, deadline)
        victim.send_signal(signal.SIGKILL)
        killed = time.time()
        rc = job.wait(timeout=60)
        elapsed = time.time() - killed
        assert rc != 0 and elapsed < 60, (rc, elapsed)
        print(f"job exited {rc} {elapsed:.1f} s after SIGKILL of rank 1")
    finally:
        if job.poll() is None:
            for p in psutil.Process(job.pid).children(recursive=True):
                p.kill()
            job.kill()
        job.wait()
    step = int(latest.read_text().strip().removeprefix("step"))
    resumed = run_deepspeed(debug_args(digits_dir, out, f"train.steps={step + 5}", "train.checkpoint_every=5",
                                       "train.eval_every=100000", "train.log_every=5") + ["--resume", "auto"])
    assert resumed.returncode == 0, explain(resumed)
    assert f"at step {step}" in resumed.stdout + resumed.stderr
    assert (out / "checkpoints" / f"step{step + 5:08d}").is_dir()


def test_sigterm_checkpoints_before_exit(digits_dir, tmp_path):
    """Preemption: SIGTERM to the whole process group (as tini -g and the launcher deliver it, data
    workers included) makes the ranks finish their step, checkpoint and exit."""
    out = tmp_path / "run"
    args = debug_args(digits_dir, out, "train.steps=100000", "train.checkpoint_every=100000",
                      "train.eval_every=100000", "train.log_every=1", "data.num_workers=2")
    job = subprocess.Popen(deepspeed_cmd(args), env=train_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and job.poll() is None:
            time.sleep(0.5)
        assert (out / "metrics.jsonl").exists(), job.stdout.read()
        os.killpg(job.pid, signal.SIGTERM)
        log = job.communicate(timeout=60)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert "stopped by a termination signal" in log, log[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert int(latest.removeprefix("step")) >= 1
