"""Training throughput, peak memory, bits/dim and model-FLOPs utilisation of nvp-dist and its peers.

    bash benchmarks/setup_peers.sh      # once: normflows and FrEIA in benchmarks/.venv-peers
    .venv/bin/python benchmarks/bench_train.py [--archs debug,cifar10,celeba64] [--batch 64] [--steps 1]
                                               [--rounds 3] [--section train|depth]

Every row is one training run in a fresh process (benchmarks/train_rows.py), so its peak memory is its own:
peak RSS (ru_maxrss) on CPU, torch.cuda.max_memory_allocated on CUDA; "+train" is that peak less the
memory held just before the first step (model and data built): gradients, Adam's state and activations.
Take memory with `--warmup 1`: a first step allocates Adam's moments only after backward has freed the
activations, so its peak hides them; from the second step on, both are alive at once.
On CPU, RSS is what the allocator holds, not what tensors use: glibc's malloc raises its mmap threshold
after the first large free and then serves tensors from a heap it cannot give back while fragmented, so a
row that allocates and frees a lot (invertible backprop, one coupling at a time) shows far more than it
keeps (CIFAR-10, batch 16, invertible+res_block: +train 474 MiB under glibc, 259 under jemalloc, of which
224 are gradients and Adam's moments). `--preload` LD_PRELOADs another allocator into every row, peers
included, so that all rows are measured under the same one; jemalloc's MALLOC_CONF, if set, reaches every
row too (`dirty_decay_ms:-1,muzzy_decay_ms:-1` keeps freed pages for reuse instead of returning them to the
system and faulting them in again on the next step: see RESULTS.md).
Rows are interleaved over rounds (the order rotated each round) and medians reported: other work on a
shared machine slows whichever row it meets; "cores" is the share of its threads' cores a row got (CPU time
over wall time x threads), to show which figures other work diluted. Each run takes warm-up Adam steps (2 on
debug, none elsewhere: a CIFAR step takes minutes on 2 cores) then timed ones (--steps, x10 on debug); then
bits/dim is the loss of the first batch in training mode, without grad, after those updates. The same
synthetic images (4 batches of smooth random colour fields, cycled) and the same dequantisation noise feed
every implementation, preprocessed and scored the package's way.

Built (see train_rows.py):
  nvp-dist   nvp_dist.flows.RealNVP(cfg.model) from the config, torch Adam with the trainer's parameter
             groups (L2 on weight-norm magnitudes and tanh scales), clipping at 100, train.memory applied
             as the trainer does (`--memory invertible+res_block` also sets activation_checkpointing);
             bf16 as the trainer's DeepSpeed run: module cast to bf16, flow statistics kept float32, Adam
             on float32 master weights. No DeepSpeed, one process.
  normflows  MultiscaleFlow: per scale 3 checkerboard AffineCouplingBlocks, Squeeze, 3 channel-wise, Merge;
             4 checkerboard at the last; ActNorm after each coupling; s/t nets ConvResidualNet (batch norm)
             with the config's blocks and widths (x2 per scale, x2 for channel-wise, as nvp-dist).
  freia      GraphINN: per scale IRevNetDownsampling (FrEIA's way to a checkerboard split), 3 AllInOneBlocks
             at the scale's width, 3 at twice it, Split; 4 at the last scale; s/t subnets the paper's ResNet.
  freia-rnvp the same graph with RNVPCouplingBlock (two-sided, separate s and t subnets): not run by default.
Peers have no memory modes and run fp32 only. Their checkerboard couplings run their s/t networks on the
kept half of the pixels (normflows) or a quarter-size downsampled image (FrEIA), where nvp-dist's run on the
masked full image as the paper's do: the FLOP column shows the difference, and MFU accounts for it.
  nvp-gather nvp-dist with model.checkerboard=gathered (the kept half packed into an H x W/2 image, as
             normflows does; an option, not the paper's model).

MFU = images/s x 3 x forward FLOPs per image / ceiling, on CPU per CPU-second on both sides (the same ratio
on an idle machine; on a shared one it does not depend on how much of the cores a row or a ceiling got, and
img/s / cores estimates the rate with the cores to itself). Forward FLOPs are counted by
torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls), training taken as 3x forward whatever
the memory mode (checkpoint and invertible recompute: about 4x and 5x, so their MFU is lower by design).
The ceiling is a measured 3x3 convolution at the architecture's first-scale width and size, forward +
backward, same dtype and batch; a large matmul's rate is printed beside it. `--section depth` instead prints
+train memory and step time of nvp-dist fp32 against depth, for each memory mode: residual blocks 1, 2, 4,
8 on the CIFAR-10 architecture and scales 2 to 5 on the 64x64 one (CIFAR's 64 feature maps doubled over 5
scales would be 1.4 billion parameters).
2-rank vs 1-rank throughput (DeepSpeed, launch/train.py): benchmarks/bench_scaling.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nvp_dist.config import load_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# name -> (config, timed steps per --steps, default warm-up steps). A CIFAR-10 or 64x64 step takes a minute
# or two on a 2-core CPU, so its first step's one-off costs (allocations, kernel selection) are noise and
# no warm-up is spent there by default; a debug step takes milliseconds, so it gets more of both.
ARCHS = {"debug": ("configs/debug.yaml", 10, 2), "cifar10": ("configs/cifar10.yaml", 1, 0),
         "celeba64": ("configs/celeba.yaml", 1, 0)}
MODES = ("standard", "checkpoint", "invertible")
MATMUL_N = 1024
LOADS: list[float] = []  # 1-minute load average after each row: how busy the machine was


def machine(device: str) -> tuple[str, bool]:
    """(a line describing the machine, whether bf16 runs natively there)."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} | torch {torch.__version__}", True
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "?"
    return (f"{model}, {os.cpu_count()} cores ({isa}), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads", native)


def arch_dict(config: str, overrides=()) -> dict:
    m = load_config(ROOT / config, overrides).model
    return {k: getattr(m, k) for k in ("in_channels", "image_size", "num_scales", "res_blocks", "mid_channels")}


def ray_jemalloc() -> Path | None:
    """The jemalloc Ray ships (`--preload jemalloc`), or None where Ray is not installed."""
    ray = importlib.util.find_spec("ray")
    return Path(ray.submodule_search_locations[0]) / "core" / "libjemalloc.so" if ray else None


def preload_path(parser: argparse.ArgumentParser, preload: str) -> str:
    """`--preload`'s library: 'jemalloc' is Ray's copy; a path must exist; '' is none."""
    if preload == "jemalloc":
        lib = ray_jemalloc()
        if lib is None:
            parser.error("--preload jemalloc: Ray, which ships it, is not installed here; give the library's path")
        preload = str(lib)
    if preload and not Path(preload).is_file():
        parser.error(f"--preload {preload}: no such file")
    return preload


def run_job(job: dict, python: str, timeout: float, preload: str = "") -> dict:
    env = {**os.environ, "LD_PRELOAD": preload} if preload else None
    try:
        done = subprocess.run([python, str(HERE / "train_rows.py"), json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(jobs: dict, rounds: int, peers_python: str, timeout: float, preload: str = "") -> dict:
    """jobs: key -> job. Runs every job once per round, the order rotated each round; returns key -> the
    list of results (a job that failed once is not run again)."""
    keys, results = list(jobs), {k: [] for k in jobs}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            if results[key] and "error" in results[key][-1]:
                continue
            job = jobs[key]
            python = sys.executable if job.get("impl", "nvp-dist") == "nvp-dist" else peers_python
            start = time.perf_counter()
            out = run_job(job, python, timeout, preload)
            LOADS.append(os.getloadavg()[0])
            results[key].append(out)
            shown = out.get("error") or ", ".join(f"{k} {v:.4g}" for k, v in out.items()
                                                  if k in ("images_per_s", "peak_mib", "flops_per_s"))
            print(f"[round {r + 1}/{rounds}] {' '.join(map(str, key))}: {shown} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return results


def median(results: list, field: str):
    ok = [r[field] for r in results if "error" not in r]
    return statistics.median(ok) if ok else None


def error(results: list) -> str | None:
    return next((r["error"] for r in results if "error" in r), None)


def train_section(args, device: str, native_bf16: bool) -> None:
    archs = args.archs.split(",")
    impls, dtypes, modes = args.impls.split(","), args.dtypes.split(","), args.memory.split(",")
    bf16_archs = args.bf16_archs.split(",") if args.bf16_archs else (archs if native_bf16 else ["debug"])
    peers_ok = Path(args.peers_python).exists()
    jobs, plan = {}, {}  # plan: arch -> (warm-up, timed) steps
    for dtype in dtypes:
        jobs[("ceiling", "matmul", dtype)] = {"kind": "matmul", "dtype": dtype, "n": MATMUL_N, "device": device}
    for name in archs:
        config, mult, warmup = ARCHS[name]
        a = arch_dict(config)
        plan[name] = (warmup if args.warmup is None else args.warmup, args.steps * mult)
        base = {"kind": "train", "config": config, "overrides": [], "arch": a, "device": device, "batch": args.batch,
                "warmup": plan[name][0], "steps": plan[name][1], "lr": load_config(ROOT / config).train.lr}
        for dtype in dtypes:
            if dtype == "bf16" and name not in bf16_archs:
                continue
            jobs[("ceiling", name, dtype)] = {"kind": "conv", "dtype": dtype, "width": a["mid_channels"],
                                              "side": a["image_size"], "batch": args.batch, "device": device}
        for impl in impls:
            if impl != "nvp-dist" and not peers_ok:
                continue
            for dtype in dtypes if impl == "nvp-dist" else ["fp32"]:
                if dtype == "bf16" and name not in bf16_archs:
                    continue
                for mode in modes if impl == "nvp-dist" else ["-"]:
                    for checker in args.checkerboard.split(",") if impl == "nvp-dist" else ["masked"]:
                        label = impl if checker == "masked" else "nvp-gather"
                        jobs[(name, label, dtype, mode)] = {**base, "impl": impl, "dtype": dtype, "memory": mode,
                                                            "overrides": [f"model.checkerboard={checker}"]}
    results = measure(jobs, args.rounds, args.peers_python, args.timeout, args.preload)

    # On CPU the MFU ratio takes both sides per CPU-second (images and ceiling FLOPs over the CPU time used):
    # on a machine to itself that is the wall-clock ratio, and on a shared one the rows and the ceilings,
    # measured at different moments, are not diluted by different amounts of other work.
    per = "_per_cpu_s" if device == "cpu" else "_per_s"
    gflops = {k[1:]: (median(v, "flops" + per) or float("nan")) / 1e9 for k, v in results.items() if k[0] == "ceiling"}
    warm = ", ".join(f"{n} {w}+{t}" for n, (w, t) in plan.items())
    print(f"\nTraining throughput and memory, batch {args.batch}, warm-up + timed steps: {warm}; median of "
          f"{args.rounds} round(s), {device}; load average {min(LOADS):.1f}-{max(LOADS):.1f} during the rows")
    print(f"machine: {args.machine}; allocator: {args.allocator}")
    if not peers_ok:
        print(f"peers skipped: {args.peers_python} missing (bash benchmarks/setup_peers.sh)")
    if "bf16" in dtypes and set(bf16_archs) != set(archs):
        print(f"bf16 rows on {','.join(bf16_archs)} only: no native bf16 here (--bf16-archs to force)")
    names = {k: f"matmul {MATMUL_N}^2 {k[1]}" if k[0] == "matmul" else f"conv3x3 {k[0]} {k[1]}" for k in gflops}
    print(f"ceilings, GFLOP per {'CPU-' if device == 'cpu' else ''}second: "
          + "; ".join(f"{names[k]} {v:.1f}" for k, v in gflops.items()))
    head = (f"{'arch':<9}{'impl':<11}{'dtype':<6}{'memory':<21}{'params':>8}{'GFLOP/img':>10}{'img/s':>8}"
            f"{'cores':>6}{'peak MiB':>9}{'+train MiB':>11}{'bits/dim':>9}{'MFU conv':>9}{'MFU mm':>8}")
    print(head + "\n" + "-" * len(head))
    for key, res in results.items():
        if key[0] == "ceiling":
            continue
        name, impl, dtype, mode = key
        label = f"{name:<9}{impl:<11}{dtype:<6}{mode:<21}"
        if median(res, "images_per_s") is None:
            print(f"{label}failed: {error(res)}")
            continue
        fwd = median(res, "fwd_flops_per_image")
        ips = median(res, "images_per_s")
        achieved = median(res, "images" + per) * 3 * fwd / 1e9
        print(f"{label}{median(res, 'params') / 1e6:7.2f}M{fwd / 1e9:10.3f}{ips:8.2f}{median(res, 'cpu_share'):6.0%}"
              f"{median(res, 'peak_mib'):9.0f}{median(res, 'train_mib'):11.0f}{median(res, 'bits_per_dim'):9.3f}"
              f"{100 * achieved / gflops[(name, dtype)]:8.1f}%{100 * achieved / gflops[('matmul', dtype)]:7.1f}%")


def depth_section(args, device: str) -> None:
    sweeps = [("cifar10", f"model.res_blocks={b}") for b in args.blocks.split(",") if b]
    sweeps += [("celeba64", f"model.num_scales={s}") for s in args.scales.split(",") if s]
    modes = args.memory.split(",")
    jobs = {}
    for name, override in sweeps:
        config = ARCHS[name][0]
        for mode in modes:
            jobs[(name, override, mode)] = {
                "kind": "train", "impl": "nvp-dist", "config": config, "overrides": [override],
                "arch": arch_dict(config, [override]), "memory": mode, "dtype": "fp32", "device": device,
                "batch": args.batch, "warmup": args.warmup or 0, "steps": 1}
    results = measure(jobs, args.rounds, args.peers_python, args.timeout, args.preload)

    print(f"\nnvp-dist fp32 memory against depth, batch {args.batch}, {args.warmup or 0} warm-up + one timed "
          f"Adam step, median of {args.rounds} "
          f"round(s), {device}; load average {min(LOADS):.1f}-{max(LOADS):.1f} during the rows")
    print(f"machine: {args.machine}; allocator: {args.allocator}")
    print("+train MiB: peak less the memory held before the step, so gradients and Adam's two moments "
          "(grad+Adam, 12 bytes a parameter) plus activations")
    short = lambda m: m[:5] + ("+" + m.partition("+")[2][:2] if "+" in m else "")  # invertible+res_block: inver+re
    cols = lambda title: "".join(f"{title + ' ' + short(m):>17}" for m in modes)
    head = f"{'arch':<9}{'blocks':>7}{'scales':>7}{'params':>9}{'grad+Adam':>10} |{cols('+train')} |{cols('s/step')}"
    print(head + "\n" + "-" * len(head))
    for name, override in sweeps:
        a = jobs[(name, override, modes[0])]["arch"]
        res = [results[(name, override, m)] for m in modes]
        params = next((median(r, "params") for r in res if median(r, "params")), float("nan"))
        cells = lambda field, spec: "".join(f"{v:{spec}}" if v is not None else f"{'failed':>17}"
                                            for v in (median(r, field) for r in res))
        print(f"{name:<9}{a['res_blocks']:>7}{a['num_scales']:>7}{params / 1e6:8.1f}M{12 * params / 2 ** 20:10.0f} |"
              f"{cells('train_mib', '17.0f')} |{cells('step_s', '17.1f')}")
    for key, r in results.items():
        if error(r):
            print(f"{' '.join(key)} failed: {error(r)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=("train", "depth"), default="train")
    p.add_argument("--archs", default="debug,cifar10,celeba64", help=f"of {','.join(ARCHS)}")
    p.add_argument("--impls", default="nvp-dist,normflows,freia", help="of nvp-dist,normflows,freia,freia-rnvp")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--bf16-archs", default="", help="archs with bf16 rows (default: all where bf16 is native, "
                   "else debug only: emulated bf16 on CPU is ~10x slower, minutes per CIFAR step)")
    p.add_argument("--memory", default=",".join(MODES), help="nvp-dist train.memory values, each optionally "
                   "+<train.activation_checkpointing>, e.g. invertible+res_block")
    p.add_argument("--checkerboard", default="masked,gathered",
                   help="nvp-dist model.checkerboard values (gathered rows are labelled nvp-gather)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=1, help="timed steps (x10 on the debug architecture)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 2 on debug, else 0)")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (train), 1 (depth: memory barely varies)")
    p.add_argument("--blocks", default="1,2,4,8", help="depth section: res_blocks on the CIFAR-10 architecture")
    p.add_argument("--scales", default="2,3,4,5", help="depth section: num_scales on the 64x64 architecture")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peers-python", default=str(HERE / ".venv-peers" / "bin" / "python"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    p.add_argument("--preload", default="", help="a malloc library LD_PRELOADed into every row, peers included; "
                   "'jemalloc' names the copy Ray ships in this environment")
    args = p.parse_args()
    args.preload = preload_path(p, args.preload)
    args.allocator = f"LD_PRELOAD={args.preload}" if args.preload else "the C library's malloc"
    if args.preload and os.environ.get("MALLOC_CONF"):  # jemalloc's settings, inherited by every row
        args.allocator += f" with MALLOC_CONF={os.environ['MALLOC_CONF']}"
    args.rounds = args.rounds or (3 if args.section == "train" else 1)
    args.machine, native_bf16 = machine(args.device)
    if args.section == "train":
        train_section(args, args.device, native_bf16)
    else:
        depth_section(args, args.device)


if __name__ == "__main__":
    main()
