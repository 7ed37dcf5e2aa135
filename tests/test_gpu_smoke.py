"""Single-GPU smoke tests (`pytest -m gpu`, .github/workflows/gpu-smoke.yml): the paths only a GPU takes.

One GPU, the real deepspeed launcher, NCCL, bf16, ZeRO-2, `memory: invertible` with residual-block
checkpointing inside it, 20 steps of the debug config: checkpoint, resume, evaluate, export, sample; the
CUDA RNG state restored; `peak_cuda_allocated_mib` logged. Without CUDA the `cuda` cases skip with the
reason and the same scenario runs as its CPU twin on one CPU rank (gloo), so the test logic runs in CI.
"""
import json
import subprocess
import sys

import pytest
import torch

from nvp_dist.train.checkpoint import rng_state, set_rng_state
from tests.launch_helpers import ROOT, debug_args, explain, records, run_deepspeed

NO_CUDA = "needs a CUDA device: torch.cuda.is_available() is False on this machine"
DEVICES = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]),
           "cpu"]
SCENARIO = ("train.zero_stage=2", "train.precision=bf16", "train.memory=invertible",
            "train.activation_checkpointing=res_block", "train.checkpoint_every=10", "train.eval_every=20",
            "train.log_every=5", "train.ema_decay=0.9")  # EMA on: bf16 EMA reads the fp32 masters


@pytest.fixture(scope="module", params=DEVICES)
def runs(request, digits_dir, tmp_path_factory):
    """20 steps in one go, and 10 steps then a resume to 20: the three launches each device's tests read."""
    device, root = request.param, tmp_path_factory.mktemp(f"smoke-{request.param}")

    def launch(out, steps, *extra):
        proc = run_deepspeed(debug_args(digits_dir, out, *SCENARIO, f"train.steps={steps}") + list(extra),
                             ranks=1, accelerator=device, timeout=600)
        assert proc.returncode == 0, explain(proc)
        return proc

    whole = launch(root / "whole", 20)
    launch(root / "part", 10)
    resumed = launch(root / "part", 20, "--resume", "auto")
    return device, root / "whole", root / "part", whole, resumed


def test_one_rank_on_the_device_backend(runs):
    device, whole, _, proc, _ = runs
    log = proc.stdout + proc.stderr
    assert f"1 ranks ({'nccl' if device == 'cuda' else 'gloo'})" in log
    assert "ZeRO 2, bf16" in log
    losses = [r["train_bits_per_dim"] for r in records(whole, "train")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses


def test_peak_memory_logged_for_the_device(runs):
    device, whole, *_ = runs
    last = records(whole, "train")[-1]
    assert last["peak_rss_mib"] > 0
    if device == "cuda":
        assert 0 < last["peak_cuda_allocated_mib"] < torch.cuda.get_device_properties(0).total_memory / 2**20
    else:
        assert "peak_cuda_allocated_mib" not in last


def test_resume_continues_the_run(runs):
    device, whole, part, _, resumed = runs
    assert "resumed from" in resumed.stdout + resumed.stderr and "step00000010 at step 10" in resumed.stderr
    a = torch.load(whole / "model_fp32.pt", weights_only=False)["model"]
    b = torch.load(part / "model_fp32.pt", weights_only=False)["model"]
    # CPU kernels are deterministic; cuDNN's backward reductions need not be (atomics), so on the GPU
    # ten steps after the resume may differ at rounding level, never by a restarted optimiser.
    atol = 1e-6 if device == "cpu" else 2e-3
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())
    saved = torch.load(part / "checkpoints" / "step00000010" / "rng_rank0.pt", weights_only=False)
    assert ("cuda" in saved) == (device == "cuda")


def test_evaluate_export_and_sample(runs):
    device, _, part, *_ = runs
    logged = records(part, "eval")[-1]
    assert logged["step"] == 20 and logged["images"] == 360
    assert (part / "samples" / "debug-step00000020.png").is_file()
    cli = subprocess.run([sys.executable, "-m", "nvp_dist.cli", "eval", "--checkpoint", str(part / "model_fp32.pt")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cli.returncode == 0, cli.stderr
    result = json.loads(cli.stdout.strip().splitlines()[-1])
    assert result["step"] == 20 and abs(result["bits_per_dim"] - logged["bits_per_dim"]) < 1e-4, (result, logged)


@pytest.mark.parametrize("device", DEVICES)
def test_rng_state_round_trip(device):
    """What a checkpoint saves of the generators (CUDA's too on a GPU) restores the next draws exactly."""
    state = rng_state()
    first = torch.randn(8, device=device)
    set_rng_state(state)
    assert torch.equal(torch.randn(8, device=device), first)
    assert ("cuda" in state) == torch.cuda.is_available()


def test_the_gpu_workflow_runs_exactly_these_tests_on_a_gpu_runner():
    import yaml

    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu-smoke.yml").read_text())
    job = flow["jobs"]["gpu-smoke"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    commands = " ".join(step.get("run", "") for step in job["steps"])
    assert "python -m pytest -m gpu -rs -q tests/test_gpu_smoke.py" in commands
    assert "torch.cuda.is_available()" in commands  # a runner without a GPU fails instead of skipping
