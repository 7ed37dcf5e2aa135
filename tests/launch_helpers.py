"""Running the real entry points (the deepspeed launcher, plain python) the way users do."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
DEBUG = str(ROOT / "configs" / "debug.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env() -> dict:
    env = dict(os.environ)
    # One thread per rank: two ranks on two cores (the launcher sets no OMP_NUM_THREADS).
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


def deepspeed_cmd(args: Sequence[str], ranks: int = 2) -> List[str]:
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), TRAIN, *args]


def run_deepspeed(args: Sequence[str], ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(deepspeed_cmd(args, ranks), env=train_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


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
    losses = [r["train_bits_per_dim"] for r in records(out, "train")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    digests = [(out / f"weights_rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
