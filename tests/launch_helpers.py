"""Running the real entry points (the deepspeed launcher, plain python) the way users do."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Sequence

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
DEBUG = str(ROOT / "configs" / "debug.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(accelerator: str = "cpu") -> dict:
    env = dict(os.environ)
    # One thread per rank: two ranks on two cores (the launcher sets no OMP_NUM_THREADS).
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR=accelerator, PYTHONUNBUFFERED="1")
    return env


def deepspeed_cmd(args: Sequence[str], ranks: int = 2) -> List[str]:
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), TRAIN, *args]


# Runs argv[2:] and writes the peak resident memory of it and everything under it to argv[1]. From a fresh
# interpreter, not from pytest: Linux carries a process's high-water RSS across fork and exec, so the
# launcher's own figure would start at pytest's RSS (~1 GB late in the suite).
_PEAK_OF_CHILDREN = ("import resource, subprocess, sys\n"
                     "code = subprocess.call(sys.argv[2:])\n"
                     "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
                     "sys.exit(code)")


def run_deepspeed(args: Sequence[str], ranks: int = 2, timeout: int = 300,
                  accelerator: str = "cpu") -> subprocess.CompletedProcess:
    """The launcher run to its end, with `peak_rss_mib` added: the largest peak resident memory of the
    launcher and every process under it, as the kernel counts it. A run past `timeout` has its whole
    process group killed and raises subprocess.TimeoutExpired."""
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak_kib"
        cmd = [sys.executable, "-c", _PEAK_OF_CHILDREN, str(peak), *deepspeed_cmd(args, ranks)]
        with subprocess.Popen(cmd, env=train_env(accelerator), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, start_new_session=True) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        done.peak_rss_mib = int(peak.read_text()) / 1024 if peak.exists() else None  # KiB on Linux
    return done


def run_python(args: Sequence[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, *args], env=train_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def debug_args(data: Path, out: Path, *overrides: str) -> List[str]:
    return ["--config", DEBUG, f"data.path={data}", f"train.out_dir={out}", *overrides]


def records(out: Path, event: str) -> List[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def train_and_check_agreement(data: Path, out: Path, *overrides: str) -> None:
    """20 debug steps on 2 ranks: the run succeeds, the logged loss falls by over 0.1 bits/dim, and both
    ranks end with bitwise identical weights."""
    proc = run_deepspeed(debug_args(data, out, *overrides, "train.steps=20", "train.log_every=5",
                                    "train.eval_every=20", "train.checkpoint_every=20"))
    assert proc.returncode == 0, explain(proc)
    train = records(out, "train")
    losses = [r["train_bits_per_dim"] for r in train]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    # The logged peak is one rank's, up to the last step; the kernel's covers every process to the end.
    peaks = [r["peak_rss_mib"] for r in train]
    assert peaks == sorted(peaks) and 0.5 * proc.peak_rss_mib < peaks[-1] <= proc.peak_rss_mib, (peaks, proc.peak_rss_mib)
    assert "peak_cuda_allocated_mib" not in train[-1]
    digests = [(out / f"weights_rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]


class ServerProcess:
    """A real server a test session runs (Prometheus, Chromium): `_proc`, writing `workdir / LOG`."""
    LOG = "server.log"
    workdir: Path
    _proc: "subprocess.Popen | None" = None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def log_tail(self, n: int = 4000) -> str:
        path = self.workdir / self.LOG
        return path.read_text(errors="replace")[-n:] if path.exists() else ""
