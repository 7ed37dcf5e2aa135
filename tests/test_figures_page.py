"""`nvp-dist figures page`: the authors' visualisation page for a trained model, checked in a real headless
Chromium (every image loads, nothing is fetched from outside the page's folder, hovering or focusing the
manifold swaps in the animation) and against the run it came from (its bits/dim, its step)."""
import json
import re
import shutil
import subprocess
import sys
from itertools import cycle

import numpy as np
import pytest
import torch
from PIL import Image

from nvp_dist.config import load_config, to_yaml
from nvp_dist.data import eval_batches
from nvp_dist.flows import RealNVP, bits_per_dim
from nvp_dist.train.checkpoint import FORMAT_VERSION
from nvp_dist.train.distributed import read_env
from nvp_dist.train.evaluate import evaluate
from tests.launch_helpers import DEBUG, ROOT

pytest_plugins = ["tests.chromium_browser"]

STEPS = 150
SEED_SECTIONS = ["Samples", "Extrapolation", "Information loss", "Manifold"]  # the seed page's ### headings
SEED_COLUMNS = ["Examples", "Samples", "Samples (twice as large)", "Samples (ten times as large)",
                "Information loss", "Manifold (hover over for animation)"]


@pytest.fixture(scope="module")
def trained_run(digits_dir, tmp_path_factory):
    """The debug model trained for a few seconds on the digits (one process, plain Adam), exported as a run
    directory whose metrics.jsonl holds its evaluation, as the trainer writes it."""
    cfg = load_config(DEBUG, [f"data.path={digits_dir}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = RealNVP(cfg.model)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _, batch in zip(range(STEPS), cycle(eval_batches(cfg.data, "train", batch_size=64))):
            loss = bits_per_dim(model, batch.images[batch.valid]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        result = evaluate(model.eval(), cfg, read_env())
    finally:
        torch.set_num_threads(threads)
    run = tmp_path_factory.mktemp("run")
    torch.save({"format_version": FORMAT_VERSION, "config": to_yaml(cfg), "step": STEPS,
                "model": model.state_dict(), "ema": None}, run / "model_fp32.pt")
    # A resumed run evaluated the step again (the last record counts); a record of another split is not it.
    records = [{"event": "eval", "step": STEPS - 50, "bits_per_dim": 9.0, "images": 360},
               {"event": "eval", "step": STEPS, "bits_per_dim": 8.0, "images": 360, "split": "test"},
               {"event": "eval", "step": STEPS, "bits_per_dim": result["bits_per_dim"], "images": 360, "split": "test",
                "data": str(cfg.data.path)},
               {"event": "eval", "step": STEPS, "bits_per_dim": 7.0, "images": 360, "split": "train"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run, result["bits_per_dim"]


@pytest.fixture(scope="module")
def page(trained_run, tmp_path_factory):
    """The page for two rows: the run's model file (bits/dim from the metrics beside it) and a copy of its model file
    alone (bits/dim computed), with the Figure 1 section."""
    run, _ = trained_run
    alone = tmp_path_factory.mktemp("alone") / "model_fp32.pt"
    shutil.copy(run / "model_fp32.pt", alone)
    out = tmp_path_factory.mktemp("page") / "site"
    proc = subprocess.run([sys.executable, "-m", "nvp_dist.cli", "figures", "page", "--checkpoint", str(run / "model_fp32.pt"),
                           "--checkpoint", str(alone), "--out", str(out), "--n", "4", "--m", "4", "--frames", "4",
                           "--temperatures", "0.7", "--toy2d", "--steps", "200"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "index.html")
    return out, proc.stderr


def test_rows_carry_the_runs_numbers(page, trained_run):
    out, stderr = page
    _, bpd = trained_run
    text = (out / "index.html").read_text()
    assert re.findall(r'<th scope="col">([^<]*)</th>', text) == [s.replace("&", "&amp;") for s in SEED_COLUMNS]
    labels = re.findall(r'<th class="row" scope="row"><b>([^<]*)</b>', text)
    assert labels == [f"debug: digits (8x8), step {STEPS}", f"debug: digits (8x8), step {STEPS}"]
    shown = [float(v) for v in re.findall(r'<span class="bpd">([0-9.]+)</span>', text)]
    assert shown == [round(bpd, 4), round(bpd, 4)]
    assert "from metrics.jsonl, 360 test images" in text and "computed on 360 test images" in text
    assert "bits/dim on test" in stderr  # the progress bar of the row it had to compute
    # what the reader needs to know: temperature, fractions (and what 2 scales could not show), examples
    # T: three sample cells and the information-loss cell per row, the Samples and Information loss sections
    assert text.count("T = 0.7") == 2 * 4 + 2 and "latents kept: 100%, 50%; resampled at T = 0.7;" in text
    assert re.search(r"Information loss</h3>\s*<p>[^<]*(<[^h][^<]*)*drawn at temperature T = 0.7", text)
    assert "25%, 12.5%, 6.25% not shown: this model has 2 scales" in text
    assert re.search(r"test images (\d+, ){15}\d+<", text)
    assert "Test log-likelihood" in text


def test_headings_follow_the_seed_page(page):
    out, _ = page
    text = (out / "index.html").read_text()
    assert re.findall(r"<h2>([^<]*)</h2>", text) == ["Visualization"]
    assert re.findall(r"<h3>([^<]*)</h3>", text) == SEED_SECTIONS + ["Figure 1: two moons"]


def test_page_in_headless_chromium(page, chromium, tmp_path):
    out, _ = page
    tab = chromium.open(out / "index.html")
    try:
        images = tab.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
                              "i.naturalWidth, i.naturalHeight])")
        # 2 rows x (6 cells + the animation) + Figure 1
        assert len(images) == 15
        for src, complete, width, height in images:
            assert complete and width > 0 and height > 0, src
        # Every request stayed inside the page's folder (the page itself, its images): the Network events
        # and the page's own resource timing agree.
        root = out.resolve().as_uri() + "/"
        resources = tab.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
        assert tab.requests and all(url.startswith(root) for url in tab.requests + resources), tab.requests
        assert len(set(tab.requests)) == 1 + 15  # the page and its 15 distinct files

        shown = ("[...document.querySelectorAll('a.manifold')[0].querySelectorAll('img')]"
                 ".filter(i => getComputedStyle(i).display !== 'none').map(i => i.currentSrc.split('/').pop())")
        assert [name.endswith(".png") for name in tab.evaluate(shown)] == [True]
        box = tab.evaluate("(() => { const a = document.querySelector('a.manifold'); a.scrollIntoView(); "
                           "const r = a.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        tab.move_mouse(*box)
        hovered = tab.evaluate(shown)
        assert len(hovered) == 1 and hovered[0].endswith("-manifold.gif")
        tab.move_mouse(1, 1)
        assert tab.evaluate(shown)[0].endswith("-manifold.png")
        tab.evaluate("document.querySelector('a.manifold').focus()")  # keyboard users get the animation too
        assert tab.evaluate(shown)[0].endswith("-manifold.gif")
        tab.evaluate("document.querySelector('a.manifold').blur()")
        # A first tap on a touch screen plays the second row's animation and stays on the page.
        second = shown.replace("[0]", "[1]")
        assert tab.evaluate(second)[0].endswith("-manifold.png")
        tab.send("Emulation.setTouchEmulationEnabled", enabled=True)
        x, y = tab.evaluate("(() => { const a = document.querySelectorAll('a.manifold')[1]; a.scrollIntoView(); "
                            "const r = a.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        tab.send("Input.dispatchTouchEvent", type="touchStart", touchPoints=[{"x": x, "y": y}])
        tab.send("Input.dispatchTouchEvent", type="touchEnd", touchPoints=[])
        assert tab.evaluate(second)[0].endswith("-manifold.gif")
        assert tab.evaluate("location.href") == (out / "index.html").resolve().as_uri()
        # A tap elsewhere on the page stops it again.
        tab.send("Input.dispatchTouchEvent", type="touchStart", touchPoints=[{"x": 2, "y": 2}])
        tab.send("Input.dispatchTouchEvent", type="touchEnd", touchPoints=[])
        assert tab.evaluate(second)[0].endswith("-manifold.png")
        tab.send("Emulation.setTouchEmulationEnabled", enabled=False)
        tab.evaluate("window.scrollTo(0, 0)")

        shot = tab.screenshot(tmp_path / "page.png")
    finally:
        tab.close()
    img = Image.open(shot)
    assert img.format == "PNG" and img.size == (chromium.width, chromium.height)
    assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # drawn, not blank
    gif = Image.open(out / hovered[0].split("-manifold")[0] / hovered[0])
    assert gif.n_frames > 1
