"""The authors' visualisation page for any trained models: `DIR/index.html` and its images, one row per
checkpoint under the seed page's columns (Examples, Samples, Samples twice and ten times as large,
Information loss, Manifold), then its four explanatory sections, and Figure 1 on request.

The site is self-contained: every image is a file beside index.html, referenced by a relative path, with
no script, style or font from anywhere else, so it opens from disk or any static host. The manifold cell
shows Equation 19's still grid and swaps in the animated eight-image sphere while the pointer is over it,
while it has keyboard focus, or after a first tap on a touch screen (a second tap follows the link, a tap
elsewhere stops it).
"""
from __future__ import annotations

import html
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple
from urllib.parse import quote

from nvp_dist.figures.compression import PAPER_FRACTIONS, compression, fraction_label, split_fractions
from nvp_dist.figures.grids import PathLike, figure_path, image_grid, save_png
from nvp_dist.figures.manifold import manifold, manifold_animation
from nvp_dist.figures.sampling import extrapolate

COLUMNS = ("Examples", "Samples", "Samples (twice as large)", "Samples (ten times as large)", "Information loss",
           "Manifold (hover over for animation)")


@dataclass(frozen=True)
class PageOptions:
    """What every row draws. `indices`: n*n evaluation images (default: drawn from `seed`); the first four
    of them make the information-loss rows and the still manifold, the first eight the animation."""

    n: int = 8  # the Examples and Samples grids are n x n
    temperature: float = 1.0
    fractions: Tuple[float, ...] = PAPER_FRACTIONS
    indices: Optional[Sequence[int]] = None
    m: int = 8
    frames: int = 16
    seed: int = 0
    use_ema: bool = True
    device: str = "cpu"
    toy2d: bool = False
    toy2d_steps: int = 1400


@dataclass(frozen=True)
class Row:
    """One checkpoint's cells: (image path relative to the page, link target, caption) per column."""

    tag: str
    label: str
    bits_per_dim: float
    bpd_source: str
    cells: List[Tuple[str, str, str]]
    animation: str
    notes: List[str]


def run_dir(checkpoint: PathLike) -> Optional[Path]:
    """The run directory a checkpoint belongs to: model_fp32.pt's folder, checkpoints/TAG/../.., the parent
    of checkpoints/, or a run dir itself; None for a checkpoint outside any run layout."""
    path = Path(checkpoint).resolve()
    if path.is_file():
        return path.parent
    if path.name == "checkpoints":
        return path.parent
    if path.parent.name == "checkpoints":
        return path.parent.parent
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        return path
    return None


def run_eval_record(checkpoint: PathLike, step: int, images: int, split: str, data: str,
                    recorded_config: bool = True) -> Optional[Tuple[dict, Path]]:
    """The last evaluation the checkpoint's own run logged for this step, split and image count (and data
    path, when the record names one). A record without a split is the run's configured evaluation split,
    so it only counts when the figures use the run's own config (`recorded_config`)."""
    from nvp_dist.train import records

    folder = run_dir(checkpoint)
    if folder is None:
        return None
    metrics, found = folder / "metrics.jsonl", None
    for record in records.read(metrics):
        if record.get("event") != "eval":
            continue
        same_split = record.get("split") == split if "split" in record else recorded_config
        same_data = "data" not in record or record["data"] == data
        if record.get("step") == step and record.get("images") == images and same_split and same_data:
            found = record  # a resumed run evaluates a step again: the last word counts
    return (found, metrics) if found else None


def row_bits_per_dim(model, cfg, checkpoint: PathLike, step: int, use_ema: bool,
                     recorded_config: bool = True) -> Tuple[float, str]:
    """(bits/dim on the evaluation split, where it came from): the run's metrics when they hold this step
    evaluated over the whole split with the same weights, else computed now with a progress bar."""
    from nvp_dist.data import read_manifest
    from nvp_dist.train.distributed import read_env
    from nvp_dist.train.evaluate import evaluate

    split = cfg.data.eval_split
    size = read_manifest(cfg.data.path).num_samples(split)
    # The trainer evaluates its Polyak averages when it keeps them: only then is its number this model's.
    if use_ema or not cfg.train.ema_decay:
        found = run_eval_record(checkpoint, step, size, split, str(cfg.data.path), recorded_config)
        if found:
            return float(found[0]["bits_per_dim"]), f"from {found[1].name}, {size} {split} images"
    env = replace(read_env(), rank=0, world_size=1, device=next(model.buffers()).device)
    result = evaluate(model, cfg, env, progress=True)
    return result["bits_per_dim"], f"computed on {result['images']} {split} images"


def safe_tag(name: str) -> str:
    """A config name made one harmless file-name component: the checkpoint is the user's (hostile), and
    its name must not lead a path out of --out (`/`, `..`) or carry control characters."""
    tag = re.sub(r"[^A-Za-z0-9._+=-]", "_", name).lstrip(".")
    return tag or "model"


def _rel(path: Path, root: Path) -> str:
    return quote(path.relative_to(root).as_posix())


def draw_row(checkpoint: PathLike, out: Path, options: PageOptions, config=None, taken: Sequence[str] = ()) -> Row:
    """Load one checkpoint and write its cells under `out/{config}-step{N}/`."""
    from nvp_dist.data import read_manifest
    from nvp_dist.figures.examples import choose_images
    from nvp_dist.train.export import load_inference_model

    model, cfg, step = load_inference_model(checkpoint, use_ema=options.use_ema, device=options.device, config=config)
    tag = safe_tag(f"{cfg.name}-step{step}")
    tag = tag if tag not in taken else f"{tag}-{len(taken)}"
    folder = out / tag
    split, n, t = cfg.data.eval_split, options.n, options.temperature
    if n < 3:
        raise ValueError("the page needs n >= 3: the manifold animation is spanned by eight examples")
    indices, images, cond = choose_images(cfg, split, n * n, options.indices, options.seed)
    bpd, source = row_bits_per_dim(model, cfg, checkpoint, step, options.use_ema, recorded_config=config is None)
    print(f"nvp-dist figures page: {tag}: {bpd:.4f} bits/dim ({source})", file=sys.stderr)

    def c(k: int):
        return None if cond is None else cond[:k]

    common = dict(out_dir=folder, tag=tag, seed=options.seed)
    examples = save_png(image_grid(images, n), figure_path(folder, tag, "examples.png"))
    sampled = extrapolate(model, n=n, factors=(1,), temperatures=(t,), cond=c(n * n), **common)[0]
    twice = extrapolate(model, n=2, factors=(2,), temperatures=(t,), cond=c(4), **common)[0]
    tenfold = extrapolate(model, n=1, factors=(10,), temperatures=(t,), cond=c(1), **common)[0]
    loss = compression(model, images[:4], fractions=options.fractions, temperature=t, cond=c(4), **common)
    still = manifold(model, images[:4], m=options.m, cond=c(4), out_dir=folder, tag=tag)
    moving = manifold_animation(model, images[:8], m=options.m, frames=options.frames, cond=c(8), out_dir=folder, tag=tag)

    size = cfg.model.image_size
    latent_sizes = [math.prod(shape) for shape in model.latent_shapes(size, size)]
    shown = ", ".join(map(fraction_label, split_fractions(latent_sizes, options.fractions)[0]))
    cells = [
        (examples, examples, f"{split} images {', '.join(map(str, indices))}"),
        (sampled.path, sampled.path, f"{n * n} samples, T = {t:g}"),
        (twice.path, twice.path, f"{2 * size}x{2 * size}, T = {t:g}"),
        (tenfold.path, tenfold.path, f"{10 * size}x{10 * size}, T = {t:g}"),
        (loss.path, loss.path, f"latents kept: {shown}; resampled at T = {t:g}; examples {', '.join(map(str, indices[:4]))}"),
        (still.path, moving.path, f"examples {', '.join(map(str, indices[:4]))} (animation: {', '.join(map(str, indices[:8]))})"),
    ]
    dataset = read_manifest(cfg.data.path).dataset
    label = f"{cfg.name}: {dataset} ({size}x{size}), step {step}"
    return Row(tag, label, bpd, source, [(_rel(a, out), _rel(b, out), cap) for a, b, cap in cells],
               _rel(moving.path, out), [loss.note] if loss.note else [])


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 90em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 6px; vertical-align: top; text-align: center; }
th.row { text-align: left; max-width: 11em; font-weight: normal; }
td img { width: 180px; image-rendering: pixelated; display: block; margin: auto; }
td .caption { font-size: 0.75em; color: #555; max-width: 180px; margin: 4px auto 0; }
a.manifold .moving { display: none; }
a.manifold:hover .still, a.manifold:focus .still, a.manifold.playing .still { display: none; }
a.manifold:hover .moving, a.manifold:focus .moving, a.manifold.playing .moving { display: block; }
.note { color: #a40; font-size: 0.85em; }
#toy2d img { width: 480px; }
"""

# First tap on a touch screen plays the animation instead of following the link; the next tap follows it.
# A tap anywhere else (or leaving the link) stops it, so at most one animation plays.
SCRIPT = """
var manifolds = document.querySelectorAll("a.manifold");
document.addEventListener("touchstart", function (e) {
  manifolds.forEach(function (a) {
    if (a.classList.contains("playing") && !a.contains(e.target)) { a.classList.remove("playing"); }
  });
});
manifolds.forEach(function (a) {
  a.addEventListener("touchstart", function (e) {
    if (!a.classList.contains("playing")) { a.classList.add("playing"); e.preventDefault(); }
  });
  a.addEventListener("blur", function () { a.classList.remove("playing"); });
});
"""


def _row_html(row: Row) -> str:
    e = html.escape
    cells = []
    for j, (src, href, caption) in enumerate(row.cells):
        if j == len(row.cells) - 1:
            inner = (f'<img class="still" src="{src}" alt="Equation 19 manifold">'
                     f'<img class="moving" src="{row.animation}" alt="animated manifold">')
            link = f'<a class="manifold" href="{href}">{inner}</a>'
        else:
            link = f'<a href="{href}"><img src="{src}" alt="{e(COLUMNS[j])}"></a>'
        cells.append(f'<td>{link}<div class="caption">{e(caption)}</div></td>')
    notes = "".join(f'<div class="note">{e(n)}</div>' for n in row.notes)
    head = (f'<th class="row" scope="row"><b>{e(row.label)}</b><br>test: <span class="bpd">{row.bits_per_dim:.4f}'
            f'</span> bits/dim<br><small>({e(row.bpd_source)})</small>{notes}</th>')
    return f"<tr>{head}{''.join(cells)}</tr>"


def _sections(options: PageOptions) -> str:
    fractions = ", ".join(fraction_label(f) for f in options.fractions)
    return f"""
<h3>Samples</h3>
<p>The generative procedure samples a vector z from a simple distribution (here a Gaussian, scaled by the
temperature T = {options.temperature:g}) and passes it through the generator network g to obtain a sample
x = g(z). The Examples column shows real images of the evaluation split, chosen at the positions its caption
lists{'' if options.indices else f' (drawn at random with seed {options.seed})'}.</p>
<h3>Extrapolation</h3>
<p>The generator network g is convolutional, so the same model draws images larger than those it was trained
on: latents of twice and ten times the size give a "texture" of the data set rather than an upsampled image.</p>
<h3>Information loss</h3>
<p>The inference model f = g<sup>-1</sup> reorganises a data point x into feature vectors
f(x) = (z<sup>(1)</sup>, ..., z<sup>(L)</sup>), from local to global. From left to right, the columns keep
the coarsest latents holding {fractions} of the variables and replace the others with resampled versions
&epsilon;<sup>(k)</sup>, drawn at temperature T = {options.temperature:g}; a model with fewer scales shows the fractions it has, as its row notes.</p>
<h3>Manifold</h3>
<p>Eight examples x<sub>1</sub>, ..., x<sub>8</sub> and their latents z<sub>i</sub> = f(x<sub>i</sub>) span a
sphere in the latent space, parametrised by three angles: z = cos(&phi;) S(z<sub>1</sub>..z<sub>4</sub>) +
sin(&phi;) S(z<sub>5</sub>..z<sub>8</sub>), with S(a, b, c, d) = cos(&phi;')(a cos(&phi;'') + b sin(&phi;'')) +
sin(&phi;')(c cos(&phi;'') + d sin(&phi;'')) on a {options.m} x {options.m} grid of (&phi;', &phi;''). The
still image is &phi; = 0 (Equation 19 through the first four examples, framed in red); hovering, focusing or
tapping it plays &phi; through {options.frames} frames. The generator g maps the sphere back to images.</p>
"""


def write_page(checkpoints: Sequence[PathLike], out_dir: PathLike, options: PageOptions = PageOptions(),
               config=None) -> Path:
    """Write `out_dir/index.html` (and its images) for these checkpoints; returns the page's path."""
    from nvp_dist.figures.toy2d import toy2d

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Row] = []
    for checkpoint in checkpoints:
        rows.append(draw_row(checkpoint, out, options, config, [r.tag for r in rows]))
    header = "".join(f"<th scope=\"col\">{html.escape(c)}</th>" for c in COLUMNS)
    toy = ""
    if options.toy2d:
        result = toy2d(out_dir=out / "toy2d", tag="toy2d", steps=options.toy2d_steps, seed=options.seed)
        toy = (f'<section id="toy2d"><h3>Figure 1: two moons</h3><a href="{_rel(result.path, out)}">'
               f'<img src="{_rel(result.path, out)}" alt="Figure 1"></a><p>Test log-likelihood '
               f'{result.test_ll:.3f} nats per point (a full-covariance Gaussian: {result.gaussian_test_ll:.3f}); '
               f'{options.toy2d_steps} training steps.</p></section>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Density estimation using Real NVP: visualisation</title>
<style>{STYLE}</style></head><body>
<h2>Visualization</h2>
<table><thead><tr><th></th>{header}</tr></thead>
<tbody>{''.join(_row_html(r) for r in rows)}</tbody></table>
{_sections(options)}{toy}
<script>{SCRIPT}</script>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path
