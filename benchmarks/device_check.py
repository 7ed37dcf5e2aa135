"""The one-command device check: on a machine with a GPU, in at most 8 minutes, the GPU smoke tests and
one table of what nvp-dist does on that GPU.

    bash benchmarks/device_check.sh [--dry-run] [--budget-s 480]     (writes $OUT/device_check.{md,json})

1. `pytest -m gpu tests/test_gpu_smoke.py` (launcher, NCCL, bf16, ZeRO-2, invertible, resume, export), given
   at most 40% of the budget (killed with their launches past it, and reported as timed out).
2. For the paper's CIFAR-10 (configs/cifar10.yaml) and 64x64 (configs/imagenet64.yaml) architectures at
   their batch of 64, one GPU, synthetic images: fp32/bf16 x memory standard/invertible x compile off/on,
   each cell `WARMUP` steps then `STEPS` timed: images/s, model FLOP utilisation against the GPU's
   published dense peak, peak allocated memory. The fp32 and bf16 standard eager CIFAR-10 cells run 200
   steps and carry the first 200 steps' bits/dim. Eager cells first, compiled after (each compile costs
   tens of seconds); cells the budget cannot fit are listed as not run, so the check ends in time.

MFU = 3 x forward FLOPs (convolutions and matmuls, torch's FlopCounterMode) x images/s / peak: the model's
FLOPs, not the invertible mode's recomputation. Peaks: bf16 rows against dense bf16 tensor-core FLOP/s;
fp32 rows against dense TF32 (cuDNN runs fp32 convolutions on TF32 tensor cores by default,
torch.backends.cudnn.allow_tf32). `--dry-run` runs everything on the CPU with the debug model, 2 steps a
cell, compile tracing through the "eager" backend: the path and the table, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_rows import build_nvp, memory_peak, sync, synthetic_images  # noqa: E402

# Published dense peaks, TFLOP/s (NVIDIA data sheets, SXM unless named): (bf16, tf32).
PEAKS_TFLOPS = {
    "H200": (989.4, 494.7), "H100 SXM": (989.4, 494.7), "H100 80GB HBM3": (989.4, 494.7),
    "H100 PCIe": (756.0, 378.0), "H100 NVL": (835.0, 417.5), "A100": (312.0, 156.0),
    "L40S": (362.1, 183.0), "L4": (121.0, 60.0), "A10": (125.0, 62.5),
}
ARCHS = {"cifar10": "configs/cifar10.yaml", "64x64": "configs/imagenet64.yaml"}
WARMUP, STEPS, TRAJECTORY = 5, 20, 200
# The dry run's model: one scale of the debug model, few channels, so tracing all eight compiled cells is cheap.
DRY_OVERRIDES = ["model.num_scales=1", "model.mid_channels=4", "train.batch_size=8"]
COLUMNS = ["arch", "precision", "memory", "compile", "images/s", "MFU", "peak MiB", "bits/dim 1 -> 200", "note"]


def peak_flops(name: str, dtype: str):
    """The dense peak FLOP/s the rows of `dtype` are held against on the GPU called `name`; None if unknown.
    First match wins: the list puts longer names (A100, L40S) before their prefixes (A10, L4)."""
    for key, (bf16, tf32) in PEAKS_TFLOPS.items():
        if all(part in name for part in key.split()):
            return (bf16 if dtype == "bf16" else tf32) * 1e12
    return None


def cells(dry_run: bool):
    archs = {"debug": "configs/debug.yaml"} if dry_run else ARCHS
    grid = [(a, p, m, c) for c in (False, True) for a in archs for p in ("fp32", "bf16") for m in ("standard", "invertible")]
    return [(a, archs[a], p, m, c) for a, p, m, c in grid]


def measure(config: str, dtype: str, memory: str, compiled: bool, steps: int, warmup: int, device: torch.device,
            backend: str, overrides: list) -> dict:
    from nvp_dist.config import load_config
    from nvp_dist.train.speed import apply_speed_options

    cfg = load_config(config, overrides)
    batch = cfg.train.batch_size
    job = {"config": config, "overrides": overrides, "memory": memory, "dtype": dtype, "fused": device.type == "cuda"}
    torch.manual_seed(0)
    model, opt, loss = build_nvp(job, device)
    apply_speed_options(model, compile=compiled, backend=backend)
    pool = synthetic_images(4 * batch, cfg.model.in_channels, cfg.model.image_size, seed=1).to(device)
    g = torch.Generator(device).manual_seed(2)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    losses, started, first_step = [], None, time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            started = time.perf_counter()
        x = pool[(step % 4) * batch:(step % 4 + 1) * batch]
        opt.zero_grad()
        value = loss(x, g)
        value.backward()
        opt.step()
        losses.append(value.item())
    seconds = time.perf_counter() - started
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss(pool[:batch], torch.Generator(device).manual_seed(3))
    return {"images_per_s": steps * batch / seconds, "peak_mib": memory_peak(device), "bits_per_dim": losses,
            "fwd_flops_per_image": counter.get_total_flops() / batch, "batch": batch,
            "first_steps_s": started - first_step}


def smoke_tests(timeout_s: float) -> str:
    """Run the gpu smoke tests within `timeout_s` (their launches are killed as a group past it, so the
    whole check keeps its budget)."""
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider",
                             "tests/test_gpu_smoke.py"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's ranks too, not just pytest
        proc.communicate()
        return f"timed out after {timeout_s:.0f} s"
    lines = [line for line in out.strip().splitlines() if line.strip()]
    return f"exit {proc.returncode}: {lines[-1] if lines else err[-500:]}"


def row(arch, dtype, memory, compiled, result, peak, long: bool) -> dict:
    r = {"arch": arch, "precision": dtype, "memory": memory, "compile": "on" if compiled else "off"}
    if "error" in result:
        return {**r, "note": result["error"]}
    flops = 3 * result["fwd_flops_per_image"] * result["images_per_s"]
    traj = result["bits_per_dim"]
    return {**r, "images/s": f"{result['images_per_s']:.1f}", "MFU": f"{flops / peak:.1%}" if peak else "n/a",
            "peak MiB": f"{result['peak_mib']:.0f}",
            "bits/dim 1 -> 200": f"{traj[0]:.3f} -> {traj[-1]:.3f} ({len(traj)} steps)" if long else "",
            "note": f"warm-up {result['first_steps_s']:.1f} s" + (" (compiles)" if compiled else "")}


def table(rows, header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU, debug model, 2 steps a cell: the path only")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time limit")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/device_check"))
    args = p.parse_args()
    started = time.monotonic()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        print("device_check: no CUDA device visible; run with --dry-run to check the path on the CPU", file=sys.stderr)
        return 2
    steps, warmup, trajectory = (2, 1, 3) if args.dry_run else (STEPS, WARMUP, TRAJECTORY)
    backend = "eager" if args.dry_run else "inductor"
    # The smoke tests may take at most 40% of the budget; the measured cells get the rest.
    smoke = smoke_tests(0.4 * args.budget_s)
    print(f"device_check: smoke tests {smoke}", flush=True)
    rows, results = [], {}
    for arch, config, dtype, memory, compiled in cells(args.dry_run):
        key = f"{arch}/{dtype}/{memory}/compile-{'on' if compiled else 'off'}"
        # The eager standard cells of the first architecture carry the 200-step trajectory.
        long = not compiled and memory == "standard" and arch == next(iter(ARCHS if not args.dry_run else ["debug"]))
        left = args.budget_s - (time.monotonic() - started)
        if left < (120 if compiled and not args.dry_run else 15 if not args.dry_run else 0):
            result = {"error": f"not run: {left:.0f} s of the budget left"}
        else:
            try:
                result = measure(config, dtype, memory, compiled, trajectory - warmup if long else steps, warmup, device, backend,
                                 DRY_OVERRIDES if args.dry_run else [])
            except torch.cuda.OutOfMemoryError:
                result = {"error": "out of memory"}
            finally:
                torch._dynamo.reset()  # each cell compiles its own model
        results[key] = result
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = peak_flops(gpu, dtype) if device.type == "cuda" else None
        rows.append(row(arch, dtype, memory, compiled, result, peak, long))
        print(f"device_check: {key} {rows[-1].get('images/s', rows[-1].get('note'))}", flush=True)
    header = (f"Device check{' (dry run: CPU, debug model, not a measurement)' if args.dry_run else ''}: {gpu}, "
              f"torch {torch.__version__}, smoke tests {smoke}, {time.monotonic() - started:.0f} s")
    text = table(rows, header)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.md").write_text(text)
    (out / "device_check.json").write_text(json.dumps({"header": header, "rows": rows, "results": results}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
