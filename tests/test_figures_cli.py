"""`nvp-dist figures KIND --checkpoint C`: every kind from an exported model file, named by config and step."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nvp_dist.config import load_config, to_yaml
from nvp_dist.flows import RealNVP
from nvp_dist.train.checkpoint import FORMAT_VERSION
from tests.flow_helpers import randomize_
from tests.launch_helpers import DEBUG, ROOT


def export_random(cfg, path, step: int = 7, seed: int = 3):
    """A randomly initialised model of `cfg` as an exported fp32 file, as `nvp-dist export` writes it."""
    model = randomize_(RealNVP(cfg.model), seed=seed)
    torch.save({"format_version": FORMAT_VERSION, "config": to_yaml(cfg), "step": step,
                "model": model.state_dict(), "ema": None}, path)
    return path


@pytest.fixture(scope="module")
def exported(digits_dir, tmp_path_factory):
    cfg = load_config(DEBUG, [f"data.path={digits_dir}"])
    return export_random(cfg, tmp_path_factory.mktemp("model") / "model_fp32.pt")


def figures(*args):
    return subprocess.run([sys.executable, "-m", "nvp_dist.cli", "figures", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("kind,expected,extra", [
    ("samples", ["debug-step7-samples-T1.png", "debug-step7-samples-T0.7.png"], []),
    # --n and --temperatures: a 3 x 3 grid per factor and temperature
    ("extrapolate", ["debug-step7-extrapolate-x2-T0.5.png", "debug-step7-extrapolate-x10-T0.5.png"],
     ["--n", 3, "--temperatures", 0.5]),
    ("compression", ["debug-step7-compression.png"], []),
    ("manifold", ["debug-step7-manifold.png", "debug-step7-manifold.gif"], []),
])
def test_figure_kinds_from_exported_model(exported, tmp_path, kind, expected, extra):
    proc = figures(kind, "--checkpoint", exported, "--out", tmp_path, "--n", 4, "--zoom", 2, "--frames", 4, *extra)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    for name in expected:
        img = Image.open(tmp_path / name)
        assert img.format in ("PNG", "GIF") and img.width % 2 == 0 and img.height % 2 == 0
    if kind == "extrapolate":  # 3 x 3 grid of 80 x 80 samples, 2-pixel padding, zoomed twice
        assert Image.open(tmp_path / expected[1]).width == 2 * (3 * 80 + 4 * 2)
    if kind == "compression":  # the debug model has 2 scales: 100% and 50% of the paper's five columns
        assert "25%, 12.5%, 6.25% not shown: this model has 2 scales" in proc.stderr


def test_indices_pick_those_evaluation_images(exported, digits_dir, tmp_path):
    from nvp_dist.figures.examples import eval_images

    indices = [300, 5, 41, 17]
    proc = figures("samples", "--checkpoint", exported, "--out", tmp_path, "--n", 2, "--temperatures", 1,
                   "--indices", *indices)
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(tmp_path / "debug-step7-samples-T1.png"))
    images, _ = eval_images(load_config(DEBUG, [f"data.path={digits_dir}"]), "test", indices)
    for i, image in enumerate(images):  # the data half: a 2 x 2 grid of 8 x 8 cells, 2-pixel padding
        top, left = 2 + (i // 2) * 10, 2 + (i % 2) * 10
        assert np.array_equal(grid[top:top + 8, left:left + 8], image[0].numpy())
    # Without --indices: a seeded random choice, not the split's first images.
    assert figures("samples", "--checkpoint", exported, "--out", tmp_path / "d", "--n", 2, "--temperatures", 1).returncode == 0
    first, _ = eval_images(load_config(DEBUG, [f"data.path={digits_dir}"]), "test", [0, 1, 2, 3])
    default = np.asarray(Image.open(tmp_path / "d" / "debug-step7-samples-T1.png"))
    assert not np.array_equal(default[2:10, 2:10], first[0, 0].numpy())


def test_attributes_needs_a_conditional_model(exported, tmp_path):
    proc = figures("attributes", "--checkpoint", exported, "--out", tmp_path)
    assert proc.returncode == 2 and "data.cond=attributes" in proc.stderr
