"""Faults through the real launcher, 2 gloo ranks: a rank killed with SIGKILL, a full disk on rank 0 and
bad data on a rank take the whole job down within seconds, with the culprit named and the exit code the
README's table gives; SIGTERM and SIGINT stop a run (mid-evaluation too) after a checkpoint, and
`--resume auto` continues as if nothing had happened."""
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import psutil
import torch

from nvp_dist.train import checkpoint as ckpt
from tests.launch_helpers import ROOT, debug_args, deepspeed_cmd, explain, records, run_deepspeed, train_env


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


class Job:
    """The launcher in its own session, its output lines collected with the time each arrived."""

    def __init__(self, args):
        self.proc = subprocess.Popen(deepspeed_cmd(args), env=train_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    @property
    def log(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, text: str) -> float:
        """When the first line holding `text` arrived."""
        times = [t for t, line in self.lines if text in line]
        assert times, f"no line with {text!r} in:\n{self.log[-6000:]}"
        return times[0]

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout=30)
        return rc


def _wait_for(path: Path, job: Job, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and job.proc.poll() is None:
        time.sleep(0.2)
    assert path.exists(), job.log[-6000:]


def test_no_space_on_rank_0_stops_every_rank_naming_it_and_resume_continues(digits_dir, tmp_path):
    """RLIMIT_FSIZE, lowered on rank 0 alone once a first checkpoint exists: its next checkpoint write fails
    with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    out = tmp_path / "run"
    common = ("train.checkpoint_every=5", "train.eval_every=100000", "train.log_every=100000")
    job = Job(debug_args(digits_dir, out, "train.steps=100000", *common))
    try:
        _wait_for(out / "checkpoints" / "latest", job)
        rank0 = _rank_process(psutil.Process(job.proc.pid), 0, time.time() + 60)
        rank0.rlimit(psutil.RLIMIT_FSIZE, (16, 16))  # no file of rank 0's may grow past 16 bytes
    finally:
        rc = job.wait(timeout=240)
    failed = job.first("rank 0 failed (exit code 1): no space left writing checkpoint")
    assert rc == 1, job.log[-6000:]
    print(f"job exited {job.lines[-1][0] - failed:.1f} s after rank 0 reported no space")
    assert job.lines[-1][0] - failed < 60
    line = next(line for _, line in job.lines if "rank 0 failed" in line)
    assert str(out / "checkpoints" / "step") in line and "EFBIG" in line, line
    # rank 1, blocked in the save's collectives, learnt it from the watchdog and exited with the same code
    assert "rank 1 stopping with exit code 1: rank 0 failed (exit code 1): no space left" in job.log
    # the previous checkpoint is intact, and a run with space again continues from it
    good = (out / "checkpoints" / "latest").read_text().strip()
    assert ckpt.verify(out / "checkpoints" / good) is None
    step = int(good.removeprefix("step"))
    resumed = run_deepspeed(debug_args(digits_dir, out, f"train.steps={step + 5}", *common) + ["--resume", "auto"])
    assert resumed.returncode == 0, explain(resumed)
    assert f"{good} at step {step}" in resumed.stdout + resumed.stderr
    assert ckpt.verify(out / "checkpoints" / ckpt.tag_for(step + 5)) is None


def test_bad_data_past_the_threshold_stops_every_rank_with_exit_2(digits_dir, tmp_path):
    data = tmp_path / "digits"
    shutil.copytree(digits_dir, data)
    shard = sorted(data.glob("train-*.tar"))[0]
    with tarfile.open(shard) as tar:  # every 10th image zeroed in place (corrupt_member, without a re-read each)
        images = [m for m in tar.getmembers() if m.name.endswith(".png")][::10]
    with open(shard, "r+b") as f:
        for member in images:
            f.seek(member.offset_data)
            f.write(b"\0" * member.size)
    out = tmp_path / "run"
    job = Job(debug_args(data, out, "train.steps=100000", "train.checkpoint_every=100000",
                         "train.eval_every=100000", "train.log_every=100000", "data.bad_min_seen=1",
                         "data.max_bad_fraction=0.0"))
    rc = job.wait(timeout=240)
    assert rc == 2, job.log[-6000:]
    failed = job.first("failed (exit code 2): DataError")
    assert "data.max_bad_fraction" in job.log
    for rank in (0, 1):  # each rank failed on the data itself, or was stopped with the culprit's code
        assert (f"rank {rank} failed (exit code 2)" in job.log
                or f"rank {rank} stopping with exit code 2: rank {1 - rank} failed" in job.log), job.log[-6000:]
    print(f"job exited {job.lines[-1][0] - failed:.1f} s after the first rank's data error")
    assert job.lines[-1][0] - failed < 60


def _run_until_stopped(args, signame: str) -> Job:
    job = Job(args + ["train.inject_signal_at_eval_batch=2", f"train.inject_signal={signame}"])
    rc = job.wait(timeout=300)
    assert rc == 143, job.log[-6000:]
    sent = job.first(f"test hook: {signame} at evaluation batch 2")
    # within the 30 s grace period a launcher or Kubernetes gives before SIGKILL
    print(f"{signame}: exited {job.lines[-1][0] - sent:.1f} s after the signal")
    assert job.lines[-1][0] - sent < 30
    assert "evaluation at step" in job.log and "abandoned" in job.log
    assert "stopped by a termination signal" in job.log
    return job


def test_sigterm_or_sigint_during_evaluation_checkpoints_and_the_resumed_run_matches(digits_dir, tmp_path):
    """SIGTERM during the evaluation at step 5, resume, SIGINT during the one at step 10, resume to 15: the
    weights equal those of one uninterrupted 15-step run."""
    common = ("train.steps=15", "train.checkpoint_every=100", "train.eval_every=5", "train.log_every=5")
    whole = run_deepspeed(debug_args(digits_dir, tmp_path / "whole", *common))
    assert whole.returncode == 0, explain(whole)
    part = tmp_path / "part"
    for step, signame in ((5, "SIGTERM"), (10, "SIGINT")):
        _run_until_stopped(debug_args(digits_dir, part, *common) + (["--resume", "auto"] if step > 5 else []),
                           signame)
        latest = (part / "checkpoints" / "latest").read_text().strip()
        assert latest == ckpt.tag_for(step) and ckpt.verify(part / "checkpoints" / latest) is None
        assert step not in [r["step"] for r in records(part, "eval")]  # the abandoned evaluation left no result
    last = run_deepspeed(debug_args(digits_dir, part, *common) + ["--resume", "auto"])
    assert last.returncode == 0, explain(last)
    a = torch.load(tmp_path / "whole" / "model_fp32.pt", weights_only=False)["model"]
    b = torch.load(part / "model_fp32.pt", weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k


def test_a_hung_rank_stops_the_others_after_peer_timeout(digits_dir, tmp_path):
    """Two ranks started on their own, as two Kubernetes pods are (no launcher to kill the survivors): rank 1
    frozen with SIGSTOP stops sending heartbeats, and rank 0, blocked in a collective with it, exits 1
    after train.peer_timeout_s instead of waiting out the collective timeout."""
    from tests.launch_helpers import TRAIN, free_port

    out = tmp_path / "run"
    args = debug_args(digits_dir, out, "train.steps=100000", "train.checkpoint_every=100000",
                      "train.eval_every=100000", "train.log_every=1", "metrics.enabled=false",
                      "train.peer_timeout_s=5")
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**train_env(), "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                   "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in (0, 1)]
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and ranks[0].poll() is None:
            time.sleep(0.2)
        assert (out / "metrics.jsonl").exists(), ranks[0].communicate()[0][-6000:]
        ranks[1].send_signal(signal.SIGSTOP)
        frozen = time.time()
        log = ranks[0].communicate(timeout=120)[0]
        elapsed = time.time() - frozen
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert ranks[0].returncode == 1, log[-6000:]
    assert "rank 0 stopping with exit code 1: rank 1 sent no heartbeat" in log, log[-6000:]
    print(f"rank 0 exited {elapsed:.1f} s after rank 1 froze (train.peer_timeout_s=5)")
    # The watchdog times silence from the last poll that saw rank 1's counter move, up to one poll interval
    # (peer_timeout_s / 10 = 0.5 s) before the freeze: so not much sooner than 5 s, and well before 60.
    assert 5 - 2 * 0.5 <= elapsed < 60
