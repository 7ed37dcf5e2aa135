"""The data pipeline's typed configuration."""
from dataclasses import dataclass


@dataclass
class DataConfig:
    # Directory holding `manifest.json` and the `{split}-NNNNNN.tar` shards (or any URL webdataset reads).
    path: str = "data/digits"
    train_split: str = "train"
    eval_split: str = "test"
    # Per-data-set transform of the paper: none | flip | lsun | celeba (see nvp_dist/data/transforms.py).
    transform: str = "none"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # Abort when more than this fraction of samples read so far were bad (corrupt, wrong size).
    max_bad_fraction: float = 0.01
