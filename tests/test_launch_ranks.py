"""Ranks from the hardware (launch/demo.sh): one per visible GPU, else 2 CPU ranks. No GPU here, so the GPUs
are a stand-in `nvidia-smi -L` listing on PATH; CUDA_VISIBLE_DEVICES is read as the driver reads it."""
import os
import subprocess
import sys

import pytest

from nvp_dist.train.distributed import launch_ranks, visible_gpus
from tests.launch_helpers import ROOT


@pytest.mark.parametrize("physical,cvd,expected", [
    (2, None, [0, 1]), (1, None, [0]), (0, None, []),
    (2, "1", [1]), (4, "2,0", [2, 0]), (2, " 1 , 0 ", [1, 0]),
    (2, "", []), (2, "-1", []), (2, "0,-1,1", [0]),  # read up to the first invalid entry
    (2, "0,5,1", [0]), (2, "1,1", [1]), (2, "a", []),
])
def test_visible_gpus_follows_the_driver(physical, cvd, expected):
    assert visible_gpus(physical, cvd) == expected


def test_uuid_entries_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="indices, not UUIDs"):
        visible_gpus(2, "GPU-8f2a")


def test_launch_ranks():
    assert launch_ranks(1, {})[:3] == (1, "cuda", ["--num_gpus", "1"])
    # the launcher drops CUDA_VISIBLE_DEVICES under --num_gpus and would renumber from 0: --include keeps GPU 1
    assert launch_ranks(2, {"CUDA_VISIBLE_DEVICES": "1"})[:3] == (1, "cuda", ["--include", "localhost:1"])
    ranks, accelerator, args, why = launch_ranks(2, {"CUDA_VISIBLE_DEVICES": ""})
    assert (ranks, accelerator, args) == (2, "cpu", ["--num_gpus", "2"]) and "hides all 2 GPUs" in why
    assert launch_ranks(0, {})[:3] == (2, "cpu", ["--num_gpus", "2"])


def _choose(tmp_path, gpus, **env):
    """`python -m nvp_dist.train.distributed` as launch/demo.sh runs it, with `gpus` listed by a stand-in
    nvidia-smi (None: no nvidia-smi on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.unlink(missing_ok=True)
    if gpus is not None:
        lines = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08x})'\n" for i in range(gpus))
        smi.write_text("#!/bin/sh\n" + lines)
        smi.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    path = f"{bin_dir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin"
    proc = subprocess.run([sys.executable, "-m", "nvp_dist.train.distributed"], capture_output=True, text=True,
                          cwd=ROOT, env={**base, "PATH": path, "PYTHONPATH": str(ROOT), **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), proc.stderr


def test_the_demo_chooses_one_rank_on_one_gpu_and_two_cpu_ranks_without(tmp_path):
    assert _choose(tmp_path, 1)[0] == "1 cuda --num_gpus 1"
    assert _choose(tmp_path, 2, CUDA_VISIBLE_DEVICES="1")[0] == "1 cuda --include localhost:1"
    line, why = _choose(tmp_path, None)
    assert line == "2 cpu --num_gpus 2" and "no NVIDIA GPU found: 2 CPU ranks" in why
    assert _choose(tmp_path, 8, CUDA_VISIBLE_DEVICES="")[0] == "2 cpu --num_gpus 2"


def test_demo_reads_the_choice():
    demo = (ROOT / "launch" / "demo.sh").read_text()
    # A separate assignment: under `set -e` a failing choice then stops the demo with its own message.
    assert "choice=$(python -m nvp_dist.train.distributed)" in demo
    assert 'read -r ranks accelerator launch_args <<< "$choice"' in demo
    assert "deepspeed $launch_args launch/train.py" in demo and "--num_gpus 2" not in demo
