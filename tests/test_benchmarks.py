"""benchmarks/bench_train.py end to end on the debug architecture: under `--preload jemalloc` (Ray's copy)
the rows run with it loaded (a row checks its own memory map) and memory modes (including a combined one)
compute the same loss; a missing library is refused, and one that ld.so cannot load fails the rows."""
import subprocess
import sys

import pytest

from benchmarks.bench_train import ray_jemalloc
from tests.launch_helpers import ROOT

JEMALLOC = ray_jemalloc()


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/bench_train.py", "--archs", "debug", "--impls", "nvp-dist",
                           "--dtypes", "fp32", "--checkerboard", "masked", "--rounds", "1", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def rows(stdout: str) -> dict:
    """memory mode -> the row's columns after it."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts[:3] == ["debug", "nvp-dist", "fp32"]:
            out[parts[3]] = parts[4:]
    return out


@pytest.mark.skipif(JEMALLOC is None or not JEMALLOC.is_file(), reason="Ray's bundled jemalloc is not in this environment")
def test_bench_train_rows_agree_across_memory_modes_under_jemalloc():
    done = bench("--memory", "standard,invertible+res_block", "--preload", "jemalloc")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"allocator: LD_PRELOAD={JEMALLOC}" in done.stdout
    table = rows(done.stdout)
    assert set(table) == {"standard", "invertible+res_block"}, done.stdout
    # params, GFLOP/img, img/s, cores, peak MiB, +train MiB, bits/dim, MFU conv, MFU mm
    assert table["standard"][0] == table["invertible+res_block"][0] == "0.05M"
    assert table["standard"][6] == table["invertible+res_block"][6]  # the same loss after the same updates
    assert float(table["standard"][2]) > 0 and float(table["standard"][4]) > 100  # img/s, peak MiB


def test_bench_train_rejects_a_missing_preload_library():
    done = bench("--preload", "/nonexistent/libjemalloc.so")
    assert done.returncode == 2 and "--preload /nonexistent/libjemalloc.so: no such file" in done.stderr


def test_a_preload_ld_so_ignores_fails_the_rows(tmp_path):
    fake = tmp_path / "libnotmalloc.so"
    fake.write_text("not a shared library\n")
    done = bench("--memory", "standard", "--preload", str(fake), "--steps", "1")
    assert done.returncode == 0, done.stderr[-2000:]  # the script reports failed rows in its table
    assert f"standard             failed: LD_PRELOAD={fake} was not loaded" in done.stdout, done.stdout
