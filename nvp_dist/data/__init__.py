"""Data: WebDataset shards from the paper's data sets, and the loader that streams them to ranks.

Writing: `write_shards(open_source(format, input), out_dir)` or `nvp-dist shards FORMAT INPUT OUT_DIR`.
Reading: `read_manifest(path)`, `train_batches(cfg, ...)`, `eval_batches(cfg, split, ...)`.
"""
from nvp_dist.data.config import DataConfig
from nvp_dist.data.loader import Batch, cond_dim, eval_batches, output_shape, train_batches
from nvp_dist.data.manifest import DataError, Manifest, read_manifest, verify_shards
from nvp_dist.data.sources import SOURCE_FORMATS, open_source
from nvp_dist.data.writer import write_shards

__all__ = [
    "Batch", "DataConfig", "DataError", "Manifest", "SOURCE_FORMATS", "cond_dim", "eval_batches",
    "open_source", "output_shape", "read_manifest", "train_batches", "verify_shards", "write_shards",
]
