"""The real `deepspeed` launcher, 2 CPU ranks on gloo, on the debug config: every ZeRO stage and
precision with activation checkpointing, resume, the non-finite guard, and start-up errors."""
import json
import subprocess
import sys

import pytest
import torch

from tests.launch_helpers import (ROOT, debug_args, explain, records, run_deepspeed, run_python,
                                  train_and_check_agreement)

# Synchronised batch norm (off in configs/debug.yaml) once per ZeRO stage: checkpoints recompute its collectives.
MATRIX = [(1, "fp32", "coupling", True), (1, "bf16", "scale", False), (2, "fp32", "scale", False),
          (2, "bf16", "coupling", True), (3, "fp32", "coupling", True), (3, "bf16", "scale", False)]


@pytest.mark.parametrize("stage,precision,ckpt,sync_bn", MATRIX)
def test_two_ranks_learn_and_agree(digits_dir, tmp_path, stage, precision, ckpt, sync_bn):
    out = tmp_path / "run"
    train_and_check_agreement(digits_dir, out, f"train.zero_stage={stage}", f"train.precision={precision}",
                              f"train.activation_checkpointing={ckpt}", f"train.sync_bn={str(sync_bn).lower()}")
    # the exported file and the sharded checkpoint, consolidated on one CPU process, both reproduce the
    # run's own distributed evaluation
    logged = records(out, "eval")[-1]
    assert logged["images"] == 360
    for source in (out / "model_fp32.pt", out):
        cli = subprocess.run([sys.executable, "-m", "nvp_dist.cli", "eval", "--checkpoint", str(source)],
                             capture_output=True, text=True, cwd=ROOT)
        assert cli.returncode == 0, cli.stderr
        result = json.loads(cli.stdout.strip().splitlines()[-1])
        assert result["step"] == 20 and result["images"] == 360
        assert abs(result["bits_per_dim"] - logged["bits_per_dim"]) < 1e-5, (result, logged)
    assert (out / "samples" / "debug-step00000020.png").is_file()


def test_resume_matches_uninterrupted_run_and_skips_a_truncated_checkpoint(digits_dir, tmp_path):
    common = ("train.checkpoint_every=5", "train.eval_every=100", "train.log_every=5")
    whole = run_deepspeed(debug_args(digits_dir, tmp_path / "whole", "train.steps=15", *common))
    assert whole.returncode == 0, explain(whole)
    part = tmp_path / "part"
    first = run_deepspeed(debug_args(digits_dir, part, "train.steps=10", *common))
    assert first.returncode == 0, explain(first)
    # Damage the newest checkpoint: resume must fall back to step 5 and replay steps 6-10 exactly.
    newest = part / "checkpoints" / "step00000010"
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    second = run_deepspeed(debug_args(digits_dir, part, "train.steps=15", *common) + ["--resume", "auto"])
    assert second.returncode == 0, explain(second)
    log = second.stdout + second.stderr
    assert "step00000010 is not usable" in log and "falling back" in log
    assert "resumed from" in log and "step00000005 at step 5" in log
    a = torch.load(tmp_path / "whole" / "model_fp32.pt", weights_only=True)["model"]
    b = torch.load(part / "model_fp32.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    bitwise = all(torch.equal(a[k], b[k]) for k in a)
    print(f"resumed run bitwise equal to the uninterrupted one: {bitwise}")


# The guard checks the loss, and the gradients either one by one as produced (ZeRO 1-3: they are reduced
# and partitioned on the way) or whole after the reduction (ZeRO 0, fp32): each path is exercised.
@pytest.mark.parametrize("into,zero", [("loss", 1), ("grad", 2), ("grad", 0)])
def test_non_finite_steps_are_skipped_on_every_rank_then_stop(digits_dir, tmp_path, into, zero):
    out = tmp_path / "nan"
    # NaN on rank 1 only, at step 3 (skipped, training goes on) and at steps 5-7 (three in a row: stop).
    proc = run_deepspeed(debug_args(digits_dir, out, "train.steps=12", "train.checkpoint_every=2", "train.log_every=1",
                                    "train.inject_nan_steps=[3,5,6,7]", "train.inject_nan_rank=1",
                                    f"train.inject_nan_into={into}", f"train.zero_stage={zero}",
                                    "train.max_consecutive_skips=3"))
    assert proc.returncode == 3, explain(proc)
    log = proc.stdout + proc.stderr
    assert "step 3: non-finite" in log and "1 skipped in all, 1 in a row" in log
    assert "3 consecutive non-finite steps up to step 7" in log
    assert "last good checkpoint" in log and "step00000004" in log
    skipped = {r["step"]: r["skipped_steps"] for r in records(out, "train")}
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[4] == 1
    # the skipped update left the weights finite: the next step's loss is an ordinary number
    finite = {r["step"]: r["train_bits_per_dim"] for r in records(out, "train")}
    assert all(5 < finite[s] < 9 for s in (1, 2, 4)), finite
    assert records(out, "train")[0]["grad_norm"] > 0  # reported whether DeepSpeed or the guard computes it


def test_batch_not_divisible_by_world_size_fails_before_training(digits_dir, tmp_path):
    proc = run_deepspeed(debug_args(digits_dir, tmp_path / "b", "train.batch_size=33"))
    assert proc.returncode == 2, explain(proc)
    assert "train.batch_size=33 does not divide by world size 2" in proc.stderr
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", "train.stepz"),
    ("data.path=/nonexistent/shards", "/nonexistent/shards"),
    ("model.in_channels=3", "expects (3, 8, 8)"),
    ("metrics.bind=256.0.0.1", "metrics.bind='256.0.0.1'"),
])
def test_bad_config_or_data_fails_before_training(digits_dir, tmp_path, override, message):
    proc = run_python(debug_args(digits_dir, tmp_path / "c", override))
    assert proc.returncode == 2, explain(proc)
    assert message in proc.stderr
    assert not (tmp_path / "c").exists()


def test_class_conditional_training_on_digits(digits_dir, tmp_path):
    out = tmp_path / "cond"
    proc = run_python(debug_args(digits_dir, out, "data.cond=class", "model.cond_dim=10", "train.steps=4",
                                 "train.eval_every=4", "train.log_every=2", "data.num_workers=0"))
    assert proc.returncode == 0, explain(proc)
    assert records(out, "eval")[-1]["images"] == 360
    assert (out / "samples" / "debug-step00000004.png").is_file()
    wrong = run_python(debug_args(digits_dir, tmp_path / "w", "data.cond=attributes", "model.cond_dim=10"))
    assert wrong.returncode == 2 and "attributes" in wrong.stderr
