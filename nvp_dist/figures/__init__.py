"""The paper's figures from a RealNVP in memory: samples, extrapolation, conceptual compression, latent
manifolds, attribute changes, and the 2-D toy of Figure 1.

Each figure is a function of a model and uint8 images that writes `{out_dir}/{tag}-{kind}.{png,gif}` and
returns what it drew; loading checkpoints is the caller's business (the tag carries config and step).
`write_page` is the exception: the authors' visualisation page loads its checkpoints itself.
"""
from nvp_dist.figures.attributes import attributes
from nvp_dist.figures.compression import compression
from nvp_dist.figures.grids import Figure, image_grid, save_gif, save_png, side_by_side
from nvp_dist.figures.manifold import manifold, manifold_animation
from nvp_dist.figures.page import PageOptions, write_page
from nvp_dist.figures.sampling import extrapolate, samples
from nvp_dist.figures.toy2d import Toy2dResult, toy2d

__all__ = [
    "Figure", "PageOptions", "Toy2dResult", "attributes", "compression", "extrapolate", "image_grid", "manifold",
    "manifold_animation", "samples", "save_gif", "save_png", "side_by_side", "toy2d", "write_page",
]
