"""Peak memory of the largest rank under each ZeRO stage: what sharding Adam's state, the gradients and the
parameters over the ranks saves, against what it would save if sharding were the only change.

    .venv/bin/python benchmarks/bench_zero.py [--config configs/cifar10.yaml] [--stages 0,1,2,3] [--ranks 2]
                                              [--steps 2] [--preload jemalloc] [key=value overrides ...]

Each run is the real thing: `deepspeed --num_gpus R launch/train.py --config C train.zero_stage=S`, one
thread per rank, on synthetic shards at the config's image size written once to a temporary folder (smooth
random colour fields as in bench_data.py: memory does not depend on the pictures; a 64-image test split
keeps the closing evaluation short). The figure is the trainer's own, from its last train record: the
largest rank's peak resident memory up to the last step (`peak_rss_mib`; `peak_cuda_allocated_mib` on CUDA).
From the second step on, Adam's moments and a step's activations are alive together, hence `--steps 2`.
s/step is the last step's time from the same record: one step, indicative only.

The "model states" column is what each rank would hold of P fp32 parameters if sharding were all that
changed: parameters 4P, gradients 4P, Adam's two moments 8P, with stage 1 sharding the moments, stage 2 also
the gradients, stage 3 also the parameters, each over R ranks. On CPU the measured peak is what the
allocator holds (see bench_train.py: take it under `--preload jemalloc`), and DeepSpeed adds buffers of its
own (a flat fp32 copy of each rank's partition in stages 1-2, reduction buckets, stage 3's gathered
parameters; on CPU the trainer sizes the buckets down, nvp_dist/train/engine.py), so read the measured
savings against the ideal ones, not the totals.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench_data import smooth_images
from bench_scaling import train_records
from bench_train import machine, preload_path
from nvp_dist.config import load_config
from nvp_dist.data import write_shards
from nvp_dist.data.sources import Source
from nvp_dist.data.sources.base import array_split
from nvp_dist.flows import RealNVP

ROOT = Path(__file__).resolve().parent.parent


def ideal_model_states_mib(params: int, stage: int, ranks: int) -> float:
    """Bytes per rank of fp32 parameters, gradients and Adam's moments with the stage's shards, in MiB."""
    shard = {0: (4, 4, 8), 1: (4, 4, 8 / ranks), 2: (4, 4 / ranks, 8 / ranks), 3: (4 / ranks, 4 / ranks, 8 / ranks)}
    return params * sum(shard[stage]) / 2**20


def write_data(root: Path, side: int, channels: int) -> Path:
    images = {"train": smooth_images(512, side, seed=0), "test": smooth_images(64, side, seed=1)}
    if channels == 1:
        images = {k: v.mean(axis=3).astype(np.uint8) for k, v in images.items()}
    splits = {k: array_split(v, np.zeros(len(v), dtype=np.int64), [str(i) for i in range(len(v))])
              for k, v in images.items()}
    write_shards(Source(f"bench{side}", "folder", "class", ["x"], splits), root, progress=False)
    return root


def run(config: str, stage: int, ranks: int, steps: int, data: Path, overrides: list, preload: str) -> dict:
    """The last train record of the stage's run."""
    return train_records(config, ranks, 1, steps, 1, [f"data.path={data}", "data.eval_split=test",
                                                      f"train.zero_stage={stage}", *overrides],
                         env={"LD_PRELOAD": preload} if preload else None)[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cifar10.yaml")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--preload", default="", help="a malloc library LD_PRELOADed into every rank; 'jemalloc' "
                   "names the copy Ray ships in this environment")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = p.parse_args()
    args.preload = preload_path(p, args.preload)
    stages = [int(s) for s in args.stages.split(",")]
    cfg = load_config(ROOT / args.config, args.overrides)
    params = sum(t.numel() for t in RealNVP(cfg.model).parameters())
    cuda = "peak_cuda_allocated_mib"
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "shards", cfg.model.image_size, cfg.model.in_channels)
        rows = {}
        for stage in stages:
            rows[stage] = run(args.config, stage, args.ranks, args.steps, data, args.overrides, args.preload)
            print(f"[stage {stage}] peak {rows[stage]['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    print(f"\n{args.config} {' '.join(args.overrides)}: {args.ranks} ranks x 1 thread, batch "
          f"{cfg.train.batch_size} (global), {args.steps} steps, {params / 1e6:.2f}M parameters, "
          f"{args.preload and 'LD_PRELOAD=' + args.preload or 'the C library malloc'}")
    # The ranks' one thread each, not this process's count, is the figure that matters.
    print(f"machine: {machine('cuda' if cuda in rows[stages[0]] else 'cpu')[0].split(' with ')[0]}")
    base = rows[stages[0]]
    saved = f"saved vs {stages[0]}"
    print(f"{'stage':<6}{'model states MiB':>18}{saved:>12}{'peak RSS MiB':>14}{saved:>12}"
          + (f"{'peak CUDA MiB':>15}{saved:>12}" if cuda in base else "") + f"{'s/step':>8}")
    for stage, row in rows.items():
        ideal, ideal0 = (ideal_model_states_mib(params, s, args.ranks) for s in (stage, stages[0]))
        line = (f"{stage:<6}{ideal:>18.1f}{ideal0 - ideal:>12.1f}{row['peak_rss_mib']:>14.0f}"
                f"{base['peak_rss_mib'] - row['peak_rss_mib']:>12.0f}")
        if cuda in row:
            line += f"{row[cuda]:>15.0f}{base[cuda] - row[cuda]:>12.0f}"
        print(line + f"{row['step_time_s']:>8.1f}")


if __name__ == "__main__":
    main()
