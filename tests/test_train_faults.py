"""A rank killed with SIGKILL takes the whole job down quickly, and `--resume auto` continues it."""
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
