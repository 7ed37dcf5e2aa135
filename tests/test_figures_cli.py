"""`nvp-dist figures KIND --checkpoint C`: every kind from an exported model file, named by config and step."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

from nvp_dist.config import load_config, to_yaml
from nvp_dist.flows import RealNVP
from nvp_dist.train.checkpoint import FORMAT_VERSION
from tests.flow_helpers import randomize_
from tests.launch_helpers import DEBUG, ROOT


@pytest.fixture(scope="module")
def exported(digits_dir, tmp_path_factory):
    cfg = load_config(DEBUG, [f"data.path={digits_dir}"])
    model = randomize_(RealNVP(cfg.model), seed=3)
    path = tmp_path_factory.mktemp("model") / "model_fp32.pt"
    torch.save({"format_version": FORMAT_VERSION, "config": to_yaml(cfg), "step": 7,
                "model": model.state_dict(), "ema": None}, path)
    return path


@pytest.mark.parametrize("kind,expected", [
    ("samples", ["debug-step7-samples-T1.png", "debug-step7-samples-T0.7.png"]),
    ("extrapolate", ["debug-step7-extrapolate-x2.png", "debug-step7-extrapolate-x10.png"]),
    ("compression", ["debug-step7-compression.png"]),
    ("manifold", ["debug-step7-manifold.png", "debug-step7-manifold.gif"]),
])
def test_figure_kinds_from_exported_model(exported, tmp_path, kind, expected):
    proc = subprocess.run([sys.executable, "-m", "nvp_dist.cli", "figures", kind, "--checkpoint", str(exported),
                           "--out", str(tmp_path), "--n", "4", "--zoom", "2", "--frames", "4"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for name in expected:
        img = Image.open(tmp_path / name)
        assert img.format in ("PNG", "GIF") and img.width % 2 == 0 and img.height % 2 == 0
    if kind == "extrapolate":  # 2 x 2 grid of 80 x 80 samples, zoomed twice
        assert Image.open(tmp_path / expected[1]).width >= 2 * 2 * 80


def test_attributes_needs_a_conditional_model(exported, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nvp_dist.cli", "figures", "attributes", "--checkpoint",
                           str(exported), "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "data.cond=attributes" in proc.stderr
