"""The model's typed configuration. Defaults are the paper's CIFAR-10 architecture."""
from dataclasses import dataclass
from enum import Enum


class CouplingForm(str, Enum):
    paper = "paper"  # y2 = x2 * exp(s) + t   (the paper's equation 7)
    official = "official"  # y2 = (x2 + t) * exp(s)   (the released TensorFlow code)


class Checkerboard(str, Enum):
    masked = "masked"  # the paper: the s/t network runs on the whole image with the changed half zeroed
    # An extension (normflows' layout): the kept half is packed row by row into an H x W/2 image, the s/t
    # network runs on that (about half the FLOPs of a checkerboard coupling) and its output is unpacked
    # onto the changed half. The same masks, log-determinant and inverse; a different network geometry.
    gathered = "gathered"


@dataclass
class ModelConfig:
    in_channels: int = 3
    image_size: int = 32
    # Number of scales; every scale but the last ends with squeeze + factor-out of half the channels.
    num_scales: int = 2
    # s/t ResNet: residual blocks and feature maps at the first scale (doubled at every later scale).
    res_blocks: int = 8
    mid_channels: int = 64
    coupling_form: CouplingForm = CouplingForm.paper
    # Feed the checkerboard mask to the s/t network as an extra input channel (the official code does).
    mask_input: bool = True
    # How checkerboard couplings feed their s/t network: masked (the paper) or gathered (see Checkerboard).
    checkerboard: Checkerboard = Checkerboard.masked
    # Batch normalisation as a flow layer after every coupling (the paper); false reproduces the peers
    # that dropped it, and makes a fresh model exactly the identity.
    coupling_bn: bool = True
    # PyTorch convention: running = (1 - momentum) * running + momentum * batch.
    bn_momentum: float = 0.05
    bn_eps: float = 1e-4
    # Length of an optional conditioning vector (class one-hot or attributes) fed to every s/t network.
    cond_dim: int = 0
    # Dropout in the s/t networks' residual blocks (0 = the paper); an extension for small data sets.
    dropout: float = 0.0
    # Logit preprocessing: y = logit(alpha + (1 - 2 alpha) x).
    alpha: float = 0.05
