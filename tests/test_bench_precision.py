"""benchmarks/bench_precision.py on run directories written as the trainer writes them (config.yaml from
the typed config, eval records in metrics.jsonl): the paired interval and verdict against hand-computed
values (t quantiles from printed tables), and refusal of runs that are not the same experiment."""
import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import pytest

from benchmarks.bench_precision import main
from nvp_dist.config import load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


@lru_cache
def config(*overrides: str):
    return load_config(ROOT / "configs" / "debug.yaml", [f"train.steps={STEPS}", *overrides])


def make_run(root: Path, precision: str, seed: int, evals: dict, *overrides: str) -> Path:
    out = root / f"{precision}-s{seed}"
    cfg = config(*overrides)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision, seed=seed, out_dir=str(out)))
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    with open(out / "metrics.jsonl", "w") as f:
        for step, bpd in evals.items():
            f.write(json.dumps({"event": "train", "step": step, "train_bits_per_dim": 9.0}) + "\n")
            f.write(json.dumps({"event": "eval", "step": step, "bits_per_dim": bpd, "images": 360}) + "\n")
    return out


def arms(root: Path, gaps: list, base: float = 4.7) -> None:
    for seed, gap in enumerate(gaps):
        make_run(root, "fp32", seed, {20: base + 1, STEPS: base + 0.01 * seed})
        make_run(root, "bf16", seed, {20: base + 1, STEPS: base + 0.01 * seed + gap})


def bench(capsys, *args) -> tuple:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_paired_interval_and_the_pairs_needed_match_hand_computed_values(tmp_path, capsys):
    # Gaps -0.01..0.03: mean 0.01, sd sqrt(0.001/4) = 0.015811, t(0.975, 4) = 2.7764 -> half-width 0.019632.
    arms(tmp_path, [-0.01, 0.0, 0.01, 0.02, 0.03])
    code, out, _ = bench(capsys, tmp_path)
    assert code == 0
    assert "paired by seed: 5 seeds [0, 1, 2, 3, 4]" in out
    assert f"{STEPS:>6}    4.7200 (0.0158)    4.7300 (0.0316)  +0.0100  -0.0096..+0.0296" in out
    # The interval fits inside +-0.02 once t(n-1) x 0.015811 / sqrt(n) < 0.01: n = 12 gives 2.2010 x
    # 0.015811 / 3.464 = 0.01005, n = 13 gives 2.1788 x 0.015811 / 3.606 = 0.00955.
    assert f"step {STEPS}: bf16 - fp32 = +0.0100, not resolved at 95% (about 13 pairs would resolve it" in out


@pytest.mark.parametrize("gaps,verdict", [
    ([0.001, -0.001, 0.002, 0.0, 0.001], "within 0.02 at 95%"),
    ([0.05, 0.051, 0.049, 0.052, 0.048], "not within 0.02 at 95%"),
    ([0.03, -0.01, 0.05, 0.01, 0.04], "not resolved at 95% (the mean gap itself is outside the tolerance)"),
])
def test_verdicts(tmp_path, capsys, gaps, verdict):
    arms(tmp_path, gaps)
    code, out, _ = bench(capsys, tmp_path)
    assert code == 0 and out.rstrip().endswith(verdict), out


def test_bookkeeping_keys_may_differ_unfinished_runs_are_left_out_and_a_resumed_step_counts_once(tmp_path, capsys):
    arms(tmp_path / "a", [0.0, 0.001])
    make_run(tmp_path / "b", "fp32", 2, {20: 4.7, STEPS: 4.7}, "train.checkpoint_every=7", "metrics.port=9999",
             "train.log_every=1", "data.num_workers=0")
    resumed = make_run(tmp_path / "b", "bf16", 2, {20: 4.7, STEPS: 9.9})
    with open(resumed / "metrics.jsonl", "a") as f:  # a resumed run evaluates its last step again
        f.write(json.dumps({"event": "eval", "step": STEPS, "bits_per_dim": 4.702}) + "\n")
    make_run(tmp_path / "b", "bf16", 3, {20: 4.7})  # still running: no evaluation at train.steps
    make_run(tmp_path / "b", "fp32", 3, {20: 4.7, STEPS: 4.7})
    code, out, _ = bench(capsys, tmp_path)
    assert code == 0, out
    assert "3 seeds [0, 1, 2]; left out, one precision only: [3]" in out
    assert f"seed gaps at step {STEPS}: +0.0000 +0.0010 +0.0020" in out


@pytest.mark.parametrize("override,culprit", [
    ("train.lr=0.001", "train.lr: 0.001 against 0.003"),
    ("model.res_blocks=2", "model.res_blocks: 2 against 1"),
    ("train.cosine=true", "train.cosine: True against False"),
])
def test_a_run_of_another_config_is_refused_naming_the_key(tmp_path, capsys, override, culprit):
    arms(tmp_path, [0.0, 0.001])
    make_run(tmp_path, "bf16", 7, {STEPS: 4.7}, override)
    code, out, err = bench(capsys, tmp_path)
    assert code == 2 and out == ""
    assert "bf16-s7 differs from" in err and culprit in err, err


def test_two_finished_runs_of_one_seed_and_precision_are_refused(tmp_path, capsys):
    arms(tmp_path / "a", [0.0, 0.001])
    make_run(tmp_path / "copy", "bf16", 1, {STEPS: 4.9})
    code, out, err = bench(capsys, tmp_path)
    assert code == 2 and out == ""
    assert "copy/bf16-s1 are both bf16, seed 1: give one" in err and "a/bf16-s1 and" in err, err


def test_unusable_inputs_fail_with_the_reason(tmp_path, capsys):
    code, _, err = bench(capsys, tmp_path)
    assert code == 2 and "no run directories (config.yaml + metrics.jsonl) under" in err
    make_run(tmp_path, "fp32", 0, {STEPS: 4.7})
    make_run(tmp_path, "fp32", 1, {STEPS: 4.7})
    code, _, err = bench(capsys, tmp_path)
    assert code == 2 and "need runs of fp32 and one other precision, found fp32" in err
    make_run(tmp_path, "bf16", 0, {STEPS: 4.7})
    code, _, err = bench(capsys, tmp_path)
    assert code == 2 and "need at least two seeds run in both precisions" in err
    (tmp_path / "fp32-s1" / "metrics.jsonl").write_text("{truncated\n")
    code, _, err = bench(capsys, tmp_path)
    assert code == 2 and "fp32-s1/metrics.jsonl line 1: not JSON" in err
    (tmp_path / "fp32-s1" / "config.yaml").write_text("model: {res_blocks: 1}\n")
    code, _, err = bench(capsys, tmp_path)
    assert code == 2 and "fp32-s1/config.yaml: not a training config" in err
    (tmp_path / "fp32-s1" / "config.yaml").write_text("model: [unclosed\n")
    code, _, err = bench(capsys, tmp_path)
    assert code == 2 and "fp32-s1/config.yaml: " in err
