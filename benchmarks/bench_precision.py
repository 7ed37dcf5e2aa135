"""bf16 against fp32 after the same steps: is the test bits/dim of the mean bf16 run within a tolerance of
the mean fp32 run, at 95%?

    python launch/sweep.py --config configs/sweeps/precision.yaml          # 2 precisions x 17 seeds
    .venv/bin/python benchmarks/bench_precision.py runs/sweeps/precision [--tol 0.02]

Any training run directories work (each holds config.yaml and metrics.jsonl; the directories given are
searched below), from launch/train.py as well as from a sweep, e.g. one run of each arm:

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python launch/train.py --config configs/debug.yaml \\
        train.steps=2000 train.cosine=true train.eval_every=500 train.precision=bf16 train.seed=0 \\
        train.out_dir=runs/precision/bf16-s0

Why seeds, and pairs: single runs of the same config end further apart than 0.02 bits/dim whatever the
precision (benchmarks/RESULTS.md), so "within 0.02" can only be said of means over seeds. Runs are paired
by `train.seed` (the same initial weights and batches in both arms) and the interval is the paired t
interval of the gaps. Runs must agree on every training key but precision, seed and bookkeeping
(IGNORED): a run of another config is refused, naming the key, rather than averaged in. The number of
ranks is not in config.yaml: give runs of one world size. Runs that have not evaluated at train.steps
(still running, stopped) are left out.
Exit codes: 0 report printed (whatever the verdict), 2 unusable runs.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from scipy import stats

from nvp_dist.sweep.config import flatten

# Keys that do not change what a run trains: where it writes, how often it logs and checkpoints, and
# how many processes decode its (seed-determined) batches.
IGNORED = ("train.precision", "train.seed", "train.out_dir", "train.log_every", "train.checkpoint_every",
           "train.keep_checkpoints", "data.num_workers", "metrics.")


@dataclass
class Run:
    path: Path
    precision: str
    seed: int
    keys: Dict[str, object]  # the flattened training config
    evals: Dict[int, float]  # step -> test bits/dim (a resumed run's repeat of a step: the last)


class RunError(Exception):
    pass


def load_run(path: Path) -> Run:
    # The resolved config the trainer wrote, as plain values: comparing runs needs their keys, not the schema.
    try:
        keys = flatten(OmegaConf.to_container(OmegaConf.load(path / "config.yaml")))
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise RunError(f"{path / 'config.yaml'}: {str(err).splitlines()[0]}") from None
    if not all(k in keys for k in ("train.precision", "train.seed", "train.steps")):
        raise RunError(f"{path / 'config.yaml'}: not a training config (no train.precision, seed or steps)")
    evals: Dict[int, float] = {}
    for n, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RunError(f"{path / 'metrics.jsonl'} line {n}: not JSON") from None
        if record.get("event") == "eval":
            evals[int(record["step"])] = float(record["bits_per_dim"])
    return Run(path, str(keys["train.precision"]), int(keys["train.seed"]), keys, evals)


def find_runs(roots: Sequence[Path]) -> List[Run]:
    dirs = set()
    for root in roots:
        if not root.is_dir():
            raise RunError(f"{root}: not a directory")
        dirs |= {m.parent for m in root.rglob("metrics.jsonl") if (m.parent / "config.yaml").is_file()}
    if not dirs:
        raise RunError(f"no run directories (config.yaml + metrics.jsonl) under {', '.join(map(str, roots))}")
    return [load_run(d) for d in sorted(dirs)]


def check_same_config(runs: List[Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        for key in sorted(set(first.keys) | set(run.keys)):
            if not key.startswith(IGNORED) and first.keys.get(key) != run.keys.get(key):
                raise RunError(f"{run.path} differs from {first.path} in {key}: {run.keys.get(key)!r} against "
                               f"{first.keys.get(key)!r}; only {', '.join(IGNORED)} may differ")


def pair_by_seed(runs: List[Run], reference: str) -> tuple[str, Dict[int, Dict[str, Run]]]:
    """(the other precision, seed -> {precision: run}) over the runs that evaluated at train.steps."""
    precisions = sorted({r.precision for r in runs})
    if reference not in precisions or len(precisions) != 2:
        raise RunError(f"need runs of {reference} and one other precision, found {', '.join(precisions)}")
    other = next(p for p in precisions if p != reference)
    seeds: Dict[int, Dict[str, Run]] = {}
    for run in runs:
        if run.keys["train.steps"] not in run.evals:
            continue  # still running, or stopped early (a sweep trial's attempt that a later one resumed)
        twin = seeds.setdefault(run.seed, {}).setdefault(run.precision, run)
        if twin is not run:
            raise RunError(f"{twin.path} and {run.path} are both {run.precision}, seed {run.seed}: give one")
    return other, seeds


def half_width(sd: float, n: int) -> float:
    """Of the paired t 95% interval of n gaps with standard deviation sd."""
    return stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


@dataclass
class Gap:
    step: int
    seeds: List[int]
    reference: List[float]
    other: List[float]

    @property
    def gaps(self) -> List[float]:
        return [b - a for a, b in zip(self.reference, self.other)]

    @property
    def mean(self) -> float:
        return statistics.mean(self.gaps)

    def interval(self) -> tuple[float, float]:
        half = half_width(statistics.stdev(self.gaps), len(self.seeds))
        return self.mean - half, self.mean + half

    def seeds_needed(self, tol: float) -> int:
        """Pairs for the 95% interval to fit inside +-tol if the mean gap and its spread stay as measured
        (0: they never would)."""
        room, sd = tol - abs(self.mean), statistics.stdev(self.gaps)
        if room <= 0:
            return 0
        n = 2
        while half_width(sd, n) >= room:
            n += 1
        return n


def gaps(seeds: Dict[int, Dict[str, Run]], reference: str, other: str) -> List[Gap]:
    pairs = [s for s in sorted(seeds) if len(seeds[s]) == 2]
    steps = set.intersection(*(set(seeds[s][p].evals) for s in pairs for p in (reference, other))) if pairs else set()
    return [Gap(step, pairs, [seeds[s][reference].evals[step] for s in pairs],
                [seeds[s][other].evals[step] for s in pairs]) for step in sorted(steps)]


def verdict(gap: Gap, tol: float) -> str:
    lo, hi = gap.interval()
    if -tol < lo and hi < tol:
        return f"within {tol} at 95%"
    if lo >= tol or hi <= -tol:
        return f"not within {tol} at 95%"
    need = gap.seeds_needed(tol)
    more = f"about {need} pairs would resolve it if the gap and its spread hold" if need else \
        "the mean gap itself is outside the tolerance"
    return f"not resolved at 95% ({more})"


def report(runs: List[Run], reference: str, tol: float) -> str:
    check_same_config(runs)
    other, seeds = pair_by_seed(runs, reference)
    unpaired = sorted(s for s in seeds if len(seeds[s]) < 2)
    table = gaps(seeds, reference, other)
    if not table or len(table[0].seeds) < 2:
        raise RunError(f"need at least two seeds run in both precisions with an evaluation at a common step "
                       f"(seeds with one precision only: {unpaired or 'none'})")
    name = runs[0].keys.get("name")
    lines = [f"{other} - {reference}, test bits/dim ({name}), paired by seed: {len(table[0].seeds)} seeds "
             f"{table[0].seeds}" + (f"; left out, one precision only: {unpaired}" if unpaired else ""),
             f"{'step':>6} {reference + ' mean (sd)':>18} {other + ' mean (sd)':>18} {'gap':>8} {'95% interval':>17}"]
    for g in table:
        lo, hi = g.interval()
        lines.append(f"{g.step:>6} {statistics.mean(g.reference):>9.4f} ({statistics.stdev(g.reference):.4f})"
                     f" {statistics.mean(g.other):>9.4f} ({statistics.stdev(g.other):.4f}) {g.mean:>+8.4f}"
                     f" {lo:>+8.4f}..{hi:+.4f}")
    last = table[-1]
    lines.append(f"seed gaps at step {last.step}: " + " ".join(f"{d:+.4f}" for d in last.gaps))
    lines.append(f"step {last.step}: {other} - {reference} = {last.mean:+.4f}, {verdict(last, tol)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="run directories, or directories holding them")
    p.add_argument("--reference", default="fp32")
    p.add_argument("--tol", type=float, default=0.02, help="bits/dim")
    args = p.parse_args(argv)
    try:
        print(report(find_runs(args.dirs), args.reference, args.tol))
    except RunError as err:
        print(f"bench_precision: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
