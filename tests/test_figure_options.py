"""`nvp-dist figures` options checked against what they promise: --indices pick those evaluation images for
every kind, --attributes-from decodes with the donor's vector, --fractions labels its columns, per-example
conditioning of the manifold, one temperature for compression and page, hostile config names, and the run
metrics the page may take its bits/dim from."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nvp_dist.config import load_config
from nvp_dist.figures.compression import compression
from nvp_dist.figures.examples import eval_images
from nvp_dist.figures.grids import image_grid, label_columns
from nvp_dist.figures.latents import decode, encode
from nvp_dist.figures.manifold import manifold
from nvp_dist.figures.page import run_eval_record, safe_tag
from nvp_dist.train.export import load_inference_model
from tests.launch_helpers import DEBUG
from tests.test_figures_cli import export_random, figures


@pytest.fixture(scope="module")
def plain(digits_dir, tmp_path_factory):
    cfg = load_config(DEBUG, [f"data.path={digits_dir}"])
    return cfg, export_random(cfg, tmp_path_factory.mktemp("plain") / "model_fp32.pt")


@pytest.fixture(scope="module")
def classes(digits_dir, tmp_path_factory):
    """A random class-conditional digits model (one-hot cond over the ten digits)."""
    cfg = load_config(DEBUG, [f"data.path={digits_dir}", "data.cond=class", "model.cond_dim=10"])
    return cfg, export_random(cfg, tmp_path_factory.mktemp("class") / "model_fp32.pt")


def cell(grid: np.ndarray, i: int, ncol: int, size: int = 8, padding: int = 2, top: int = 0) -> np.ndarray:
    row, col = divmod(i, ncol)
    y, x = top + padding + row * (size + padding), padding + col * (size + padding)
    return grid[y:y + size, x:x + size]


def test_compression_indices_and_fractions_labels(plain, tmp_path):
    cfg, path = plain
    indices = [300, 5, 41]
    proc = figures("compression", "--checkpoint", path, "--out", tmp_path, "--n", 3, "--indices", *indices,
                   "--fractions", 1, 0.5, "--temperatures", 0.5)
    assert proc.returncode == 0, proc.stderr
    assert "resampled latents drawn at T = 0.5" in proc.stderr and "not shown" not in proc.stderr
    picture = np.asarray(Image.open(tmp_path / "debug-step7-compression.png"))
    images, _ = eval_images(cfg, "test", indices)
    model, _, _ = load_inference_model(path)
    fig = compression(model, images, fractions=(1, 0.5), temperature=0.5, out_dir=tmp_path / "ref")
    # The labels: the header label_columns draws for "100%" and "50%" over this grid, and nothing else.
    grid = image_grid(fig.images.flatten(0, 1), 2)
    expected = label_columns(grid, ["100%", "50%"], 8, 2)
    assert np.array_equal(picture, expected[:, :, 0])
    assert not np.array_equal(picture, label_columns(grid, ["100%", "25%"], 8, 2)[:, :, 0])
    # The rows are those evaluation images: the 100% column keeps every latent, so it is the image.
    factor = (picture.shape[1]) // grid.shape[1]
    body = picture[picture.shape[0] - grid.shape[0] * factor:][::factor, ::factor]
    for i, image in enumerate(images):
        assert np.array_equal(cell(body, 2 * i, 2), image[0].numpy())


def test_manifold_indices_pick_those_images(plain, tmp_path):
    cfg, path = plain
    indices = [300, 5, 41, 17, 2, 99, 8, 64]
    proc = figures("manifold", "--checkpoint", path, "--out", tmp_path, "--m", 4, "--frames", 4, "--indices", *indices)
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(tmp_path / "debug-step7-manifold.png").convert("L"))
    images, _ = eval_images(cfg, "test", indices)
    # The sources z1..z4 sit at (phi', phi) = (0, 0), (pi/2, 0), (0, pi/2), (pi/2, pi/2): cells 0, 4, 1, 5.
    for image, at in zip(images[:4], [0, 4, 1, 5]):
        assert np.array_equal(cell(grid, at, 4), image[0].numpy())
    gif = Image.open(tmp_path / "debug-step7-manifold.gif")
    gif.seek(1)  # frame frames/4: the sphere through z5..z8
    second = np.asarray(gif.convert("L"))
    for image, at in zip(images[4:], [0, 4, 1, 5]):
        assert np.array_equal(cell(second, at, 4), image[0].numpy())


def test_manifold_encodes_each_example_with_its_own_vector(classes, tmp_path):
    cfg, path = classes
    indices = [0, 1, 2, 3, 4, 5, 6, 7]
    images, cond = eval_images(cfg, "test", indices)
    assert len({int(c.argmax()) for c in cond[:4]}) > 1  # the sources are of different classes
    proc = figures("manifold", "--checkpoint", path, "--out", tmp_path, "--m", 4, "--frames", 4, "--indices", *indices)
    assert proc.returncode == 0, proc.stderr
    model, _, _ = load_inference_model(path)
    own = manifold(model, images[:4], m=4, cond=cond[:4], out_dir=tmp_path / "own").images
    shared = manifold(model, images[:4], m=4, cond=cond[0], out_dir=tmp_path / "shared").images
    written = np.asarray(Image.open(tmp_path / "debug-step7-manifold.png").convert("L"))
    for i in range(16):
        assert np.array_equal(cell(written, i, 4), own.flatten(0, 1)[i, 0].numpy())
    assert not torch.equal(own, shared)
    # Each source cell decodes its own image under its own vector: z_i = f(x_i | c_i) comes back as x_i.
    for image, (r, c) in zip(images[:4], [(0, 0), (1, 0), (0, 1), (1, 1)]):
        assert torch.equal(own[r, c], image)


def test_attributes_from_decodes_with_the_donors_vector(classes, tmp_path):
    from nvp_dist.figures import attributes

    cfg, path = classes
    rows, donor = [0, 1], 7
    images, cond = eval_images(cfg, "test", rows)
    _, donor_cond = eval_images(cfg, "test", [donor])
    assert all(int(c.argmax()) != int(donor_cond[0].argmax()) for c in cond)
    model, _, _ = load_inference_model(path)
    fig = attributes(model, images, cond, [str(i) for i in range(10)], ["3"], classes=True,
                     cond_from=donor_cond[0], out_dir=tmp_path / "ref")
    expected = decode(model, encode(model, images, cond.float()), donor_cond.float().expand(2, -1))
    assert torch.equal(fig.images[:, -1], expected)

    proc = figures("attributes", "--checkpoint", path, "--out", tmp_path, "--n", 2, "--flip", "3",
                   "--indices", *rows, "--attributes-from", donor)
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(tmp_path / "debug-step7-attributes.png"))
    for r in range(2):
        assert np.array_equal(cell(grid, 4 * r, 4), images[r, 0].numpy())  # the rows are those images
        assert np.array_equal(cell(grid, 4 * r + 3, 4), expected[r, 0].numpy())
        # the donor's vector redraws the digit: not the reconstruction under the row's own vector
        assert not np.array_equal(cell(grid, 4 * r + 3, 4), cell(grid, 4 * r + 1, 4))


@pytest.mark.parametrize("args,message", [
    (["--zoom", 2], "does not take --zoom"),
    (["--split", "train"], "not --split"),
    (["--temperatures", 1, 0.7], "one temperature"),
])
def test_page_refuses_options_it_would_ignore(plain, tmp_path, args, message):
    proc = figures("page", "--checkpoint", plain[1], "--out", tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "index.html").exists()


def test_compression_takes_one_temperature(plain, tmp_path):
    proc = figures("compression", "--checkpoint", plain[1], "--out", tmp_path, "--temperatures", 1, 0.7)
    assert proc.returncode == 2 and "one temperature" in proc.stderr


def test_hostile_config_name_stays_inside_out(digits_dir, tmp_path):
    cfg = load_config(DEBUG, [f"data.path={digits_dir}"])
    cfg.name = "../../escaped/\x1b[31m..x"
    path = export_random(cfg, tmp_path / "hostile.pt")
    out = tmp_path / "a" / "b" / "out"
    before = set(tmp_path.rglob("*"))
    proc = figures("page", "--checkpoint", path, "--out", out, "--n", 3, "--m", 4, "--frames", 4)
    assert proc.returncode == 0, proc.stderr
    written = set(tmp_path.rglob("*")) - before
    assert written and all(p.resolve().is_relative_to(out.resolve()) or p.resolve() in out.resolve().parents
                           for p in written)
    assert not any(ord(ch) < 32 for p in written for ch in p.name)
    assert safe_tag("../../escaped/\x1b[31m..x-step7") == "_.._escaped___31m..x-step7"
    assert safe_tag("..") == "model" and "/" not in safe_tag("a/b") and safe_tag("default-step5") == "default-step5"


def test_page_takes_only_its_own_runs_matching_evaluation(tmp_path):
    def write(folder, records):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    ev = dict(event="eval", step=5, images=360)
    run = tmp_path / "run"
    write(run, [{**ev, "bits_per_dim": 3.0, "split": "test", "data": "/d"},
                {**ev, "bits_per_dim": 2.0, "split": "test", "data": "/d"},  # the step evaluated again
                {**ev, "bits_per_dim": 9.0, "split": "train", "data": "/d"},
                {**ev, "bits_per_dim": 8.0, "split": "test", "data": "/other"}])
    (run / "checkpoints" / "step5").mkdir(parents=True)
    (run / "model_fp32.pt").write_bytes(b"")
    for checkpoint in (run / "model_fp32.pt", run / "checkpoints" / "step5", run / "checkpoints", run):
        found = run_eval_record(checkpoint, 5, 360, "test", "/d")
        assert found and found[0]["bits_per_dim"] == 2.0, checkpoint
    assert run_eval_record(run, 5, 360, "valid", "/d") is None
    assert run_eval_record(run, 5, 359, "test", "/d") is None
    # A model file in some folder below a run is not that run's: no metrics from up to 3 parents.
    (run / "copies" / "x").mkdir(parents=True)
    (run / "copies" / "x" / "model_fp32.pt").write_bytes(b"")
    assert run_eval_record(run / "copies" / "x" / "model_fp32.pt", 5, 360, "test", "/d") is None
    # Records from before the trainer named the split count only for the run's own config.
    write(tmp_path / "old", [{**ev, "bits_per_dim": 4.0}])
    assert run_eval_record(tmp_path / "old", 5, 360, "test", "/d")[0]["bits_per_dim"] == 4.0
    assert run_eval_record(tmp_path / "old", 5, 360, "test", "/d", recorded_config=False) is None
