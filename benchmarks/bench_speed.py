"""The speed options (train.compile, train.channels_last) against eager NCHW through the real launcher.

    .venv/bin/python benchmarks/bench_speed.py --data data/digits [--config configs/debug.yaml] [--steps 100]

Each arm is `deepspeed --num_gpus 2 launch/train.py` with 1 thread a rank, the same seed and data order.
Reported per arm: start-up (launch to the first train record, which includes torch.compile's first
compilation), the step time from step 50 on (wall clock between train records), and the largest gap of its
train bits/dim trajectory (every 10 steps) from the eager one's.
"""
from __future__ import annotations

import argparse
import time

from bench_scaling import train_records

ARMS = {"eager": [], "compile": ["train.compile=true"], "channels_last": ["train.channels_last=true"],
        "compile+channels_last": ["train.compile=true", "train.channels_last=true"]}
SKIP = 50


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/debug.yaml")
    p.add_argument("--data", required=True, help="the config's data.path (digits shards)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--arms", nargs="*", default=list(ARMS))
    args = p.parse_args()
    base = None
    print("| arm | start-up to step 10 (s) | step (s) | max bits/dim gap to eager |")
    print("|---|---|---|---|")
    for arm in args.arms:
        started = time.time()
        recs = train_records(args.config, 2, 1, args.steps, 10, [f"data.path={args.data}", *ARMS[arm]])
        first = recs[0]["time"] - started
        marks = [(r["step"], r["time"]) for r in recs if r["step"] >= SKIP]
        step = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
        traj = [r["train_bits_per_dim"] for r in recs]
        base = base or traj
        gap = max(abs(a - b) for a, b in zip(traj, base))
        print(f"| {arm} | {first:.1f} | {step:.3f} | {gap:.4f} |", flush=True)
        print("  trajectory:", " ".join(f"{v:.4f}" for v in traj), flush=True)


if __name__ == "__main__":
    main()
