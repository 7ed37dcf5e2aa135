"""2 ranks x 1 thread against 1 rank x 2 threads on the same cores: the DeepSpeed path's scaling efficiency.

    .venv/bin/python benchmarks/bench_scaling.py [--config configs/default.yaml] [--steps 300] [--rounds 3]

Each run is the real thing: `deepspeed --num_gpus R launch/train.py` with OMP_NUM_THREADS=T, the same global
batch, evaluation and checkpoints pushed past the end. A run's step time is wall-clock time between the
trainer's train records (metrics.jsonl, every 50 steps) from step 100 to the last, over the steps between:
everything a step costs, logging included (logging every step would add a collective and a file write per
step, which weighs on 2 ranks more than on 1). Runs alternate between the two layouts over rounds and the
medians over rounds are compared. Efficiency = (2-rank images/s) / (1-rank images/s).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = 100  # first steps: allocations, data pipeline start, the launcher's start-up noise


def train_records(config: str, ranks: int, threads: int, steps: int, log_every: int, overrides: list[str],
                  env: dict | None = None) -> list[dict]:
    """The train records of one `deepspeed --num_gpus R launch/train.py` run with OMP_NUM_THREADS=T, evaluation
    and checkpoints pushed past the end, in a throw-away out_dir; `env` adds to the environment."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
        with socket.socket() as sock:  # a free port: other launches may hold DeepSpeed's default 29500
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
               "launch/train.py",
               "--config", config, f"train.out_dir={out}", f"train.steps={steps}", f"train.log_every={log_every}",
               f"train.eval_every={steps + 1}", f"train.checkpoint_every={steps + 1}", *overrides]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        return [r for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if r.get("event") == "train"]


def run(config: str, ranks: int, threads: int, steps: int, overrides: list[str]) -> float:
    marks = [(r["step"], r["time"]) for r in train_records(config, ranks, threads, steps, 50, overrides)
             if r["step"] >= SKIP]
    (first, t0), (last, t1) = marks[0], marks[-1]
    return (t1 - t0) / (last - first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = p.parse_args()
    if args.steps < SKIP + 100:  # train records every 50 steps: at least two marks after SKIP
        p.error(f"--steps must be at least {SKIP + 100}")
    cores = os.cpu_count() or 2
    layouts = {f"1 rank x {cores} threads": (1, cores), f"{cores} ranks x 1 thread": (cores, 1)}
    step = {name: [] for name in layouts}
    for r in range(args.rounds):
        for name in (list(layouts) if r % 2 == 0 else list(reversed(layouts))):
            step[name].append(run(args.config, *layouts[name], args.steps, args.overrides))
            print(f"[round {r + 1}/{args.rounds}] {name}: {step[name][-1]:.3f} s/step", file=sys.stderr, flush=True)
    print(f"\n{args.config} {' '.join(args.overrides)}: mean step over steps {SKIP + 1}-{args.steps}, "
          f"median of {args.rounds} rounds, same global batch, {cores} cores")
    med = {name: statistics.median(v) for name, v in step.items()}
    for name, s in med.items():
        print(f"{name:<24}{s:8.3f} s/step   rounds: {', '.join(f'{v:.3f}' for v in step[name])}")
    one, many = med.values()
    print(f"scaling efficiency ({cores} ranks / 1 rank throughput): {one / many:.2f}")


if __name__ == "__main__":
    main()
