"""User files never run code: crafted pickles given as model files, checkpoints or CIFAR batches are refused
and create nothing; shell-backed data paths need an explicit opt-in."""
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from nvp_dist.config import load_config, to_yaml
from nvp_dist.data import DataError, open_source
from nvp_dist.data.manifest import verify_shards
from nvp_dist.train import checkpoint as ckpt
from tests.launch_helpers import DEBUG, ROOT, debug_args, explain, run_deepspeed, run_python, train_env


class CreatesAFile:
    """Unpickling this calls open(marker, "w"): the file appears if anything unpickles it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class RunsACommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_checkpoint(tag_dir, marker):
    """A checkpoint directory whose manifest matches (anyone can write one) and whose DeepSpeed model file,
    read by DeepSpeed's full unpickler, would create `marker`."""
    tag_dir.mkdir(parents=True)
    torch.save({"format_version": ckpt.FORMAT_VERSION, "step": 1, "config": to_yaml(load_config(DEBUG)),
                "data_batches": 1, "skipped_steps": 0, "best_eval": 9.0, "ema": None}, tag_dir / "nvp_state.pt")
    torch.save({"module": CreatesAFile(marker)}, tag_dir / "mp_rank_00_model_states.pt")
    ckpt.write_manifest(tag_dir)
    return tag_dir


def nvp_dist(*args):
    env = {**train_env(), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "nvp_dist.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["eval", "figures", "export"])
def test_crafted_model_file_is_refused(command, tmp_path):
    marker = tmp_path / "pwned"
    args = {"figures": ["samples", "--out", str(tmp_path / "fig")], "export": ["--out", str(tmp_path / "x.pt")],
            "eval": []}[command]
    if command != "export":  # an exported model file; export reads checkpoint directories only
        model = tmp_path / "model_fp32.pt"
        torch.save({"format_version": 2, "model": CreatesAFile(marker)}, model)
        done = nvp_dist(command, *args, "--checkpoint", str(model))
        assert done.returncode == 2 and "refused to load" in done.stderr and str(model) in done.stderr, explain(done)
        assert not marker.exists()
    # A checkpoint directory whose DeepSpeed files carry the payload, its manifest intact.
    tag = crafted_checkpoint(tmp_path / "run" / "checkpoints" / "step00000001", marker)
    (tag.parent / "latest").write_text(tag.name)
    done = nvp_dist(command, *args, "--checkpoint", str(tmp_path / "run"))
    assert done.returncode == 2 and "refused to load" in done.stderr, explain(done)
    assert "mp_rank_00_model_states.pt" in done.stderr and not marker.exists()


def test_crafted_checkpoint_is_refused_on_resume(digits_dir, tmp_path):
    marker = tmp_path / "pwned"
    tag = crafted_checkpoint(tmp_path / "evil" / "step00000001", marker)
    done = run_deepspeed(debug_args(digits_dir, tmp_path / "run", "train.steps=2") + ["--resume", str(tag)])
    assert done.returncode == 2, explain(done)
    assert "refused to load" in done.stderr and "mp_rank_00_model_states.pt" in done.stderr, explain(done)
    assert not marker.exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_shell_data_paths_need_the_opt_in(tmp_path):
    marker = tmp_path / "pwned"
    done = run_python(["--config", DEBUG, f"data.path=pipe:touch {marker}", f"train.out_dir={tmp_path / 'run'}"])
    assert done.returncode == 2 and "data.allow_shell_paths" in done.stderr, explain(done)
    assert not marker.exists() and not (tmp_path / "run").exists()
    for path in ("gs://bucket/data", "s3://bucket/data"):
        with pytest.raises(ValueError, match="data.allow_shell_paths"):
            load_config(DEBUG, [f"data.path={path}"])
    assert load_config(DEBUG, ["data.path=pipe:cat x", "data.allow_shell_paths=true"]).data.allow_shell_paths
    load_config(DEBUG, ["data.path=https://example.org/digits"])  # read by nvp-dist itself, no command
    with pytest.raises(DataError, match="local data set"):
        verify_shards(f"pipe:touch {marker}")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [CreatesAFile, RunsACommand])
def test_cifar_batch_with_a_code_global_is_refused(payload, tmp_path):
    from tests.data_fixtures import write_cifar

    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    real = pickle.loads(batch.read_bytes(), encoding="bytes")
    batch.write_bytes(pickle.dumps({**real, b"batch_label": payload(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_2: refused global (io\.open|builtins\.open|posix\.system)"):
        open_source("cifar10", str(tmp_path))
    assert not marker.exists()


def test_rng_state_round_trips_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_format_1_rng_files_still_load(tmp_path):
    """Format 1 stored numpy's and Python's own state tuples: read with numpy arrays allowed, nothing else."""
    np.random.seed(5), random.seed(6)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(old, tmp_path / "rng_rank0.pt")
    expected = (np.random.rand(), random.random())
    np.random.seed(0), random.seed(0)
    ckpt.set_rng_state(ckpt.read_rng_state(tmp_path / "rng_rank0.pt"))
    assert (np.random.rand(), random.random()) == expected
