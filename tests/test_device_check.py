"""benchmarks/device_check.py: its dry run on the CPU goes through every step of the GPU check (smoke
tests, the 16-cell grid with compile, the 200-step trajectory cells, the table in $OUT) on a tiny model."""
import json
import os
import subprocess
import sys

import pytest

from tests.launch_helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from device_check import COLUMNS, peak_flops  # noqa: E402


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H100 80GB HBM3", "fp32", 494.7), ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A10", "bf16", 125.0), ("NVIDIA L40S", "fp32", 183.0),
    ("NVIDIA L4", "bf16", 121.0),
])
def test_published_peaks_by_device_name(name, dtype, tflops):
    assert peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


def test_unknown_gpu_has_no_peak():
    assert peak_flops("NVIDIA GeForce GTX 1080", "bf16") is None


def test_dry_run_writes_and_prints_one_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "benchmarks/device_check.py", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "device_check.md").read_text()
    assert text in done.stdout  # printed as written
    header, _, head, rule, *body = text.strip().splitlines()
    assert "dry run" in header and "smoke tests exit 0" in header and "5 skipped" in header
    assert head == "| " + " | ".join(COLUMNS) + " |"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    assert len(cells) == 8  # one architecture in the dry run: 2 precisions x 2 memory modes x compile off/on
    assert {(c[1], c[2], c[3]) for c in cells} == {(p, m, o) for p in ("fp32", "bf16")
                                                 for m in ("standard", "invertible") for o in ("off", "on")}
    for c in cells:
        assert float(c[4]) > 0 and c[5] == "n/a" and float(c[6]) > 0, c
    # the standard eager cells carry the trajectory: 3 steps in the dry run
    assert sum("(3 steps)" in c[7] for c in cells) == 2
    data = json.loads((tmp_path / "device_check.json").read_text())
    assert len(data["results"]["debug/bf16/standard/compile-off"]["bits_per_dim"]) == 3


def test_without_a_gpu_the_real_check_refuses(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/device_check.py", "--out", str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--dry-run" in done.stderr
    assert not (tmp_path / "device_check.md").exists()
