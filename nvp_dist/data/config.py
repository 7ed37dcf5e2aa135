"""The data pipeline's typed configuration."""
from dataclasses import dataclass

TRANSFORMS = ("none", "flip", "lsun", "celeba")
CONDS = ("none", "class", "attributes")


@dataclass
class DataConfig:
    # Directory holding `manifest.json` and the `{split}-NNNNNN.tar` shards, or the URL of one: http(s)
    # (pieces fetched with Range requests), or pipe:/gs:// and the like through webdataset's gopen (there
    # the bytes before a piece are read and dropped: use small shards; needs allow_shell_paths below).
    path: str = "data/digits"
    # Split names as written in the manifest (digits/cifar10: train, test; imagenet/lsun/celeba: train, val).
    train_split: str = "train"
    eval_split: str = "test"
    # Per-data-set transform of the paper (nvp_dist/data/transforms.py): none (ImageNet, digits) |
    # flip (CIFAR-10: random horizontal flips) | lsun (shortest side to 96, random 64x64 crop, flip) |
    # celeba (rows 40:188, cols 15:163, resized to 64x64, flip). Evaluation never flips and centre-crops.
    transform: str = "none"
    # DataLoader worker processes per rank; 0 decodes in the training process. The stream does not depend
    # on it: a run may resume with a different worker count and still see the same batches.
    num_workers: int = 2
    # Samples shuffled together: the training stream is cut into chunks of about this many samples, drawn
    # as pieces from random places of random shards and fully permuted. It also bounds the raw (undecoded)
    # reads needed to resume mid-chunk, and the memory each worker holds (one decoded chunk plus prefetch).
    shuffle_buffer: int = 1000
    # Abort when more than this fraction of samples read so far were bad (corrupt, wrong size, missing).
    max_bad_fraction: float = 0.01
    # ...but only once this many samples were read, so that one early bad sample does not abort a run.
    bad_min_seen: int = 500
    # Conditioning returned with each batch: none | class (one-hot labels) | attributes (CelebA's 0/1
    # attributes). The manifest must carry that kind of label.
    cond: str = "none"
    # data.path values that webdataset's gopen opens by running a command (pipe:..., gs://, s3://, sftp://)
    # are refused unless this is true: such a path is a shell command line. Only a user's own config or
    # override can set it; the config stored in a checkpoint or model file never does.
    allow_shell_paths: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the dotted key of the first inconsistent field."""
        if not self.path:
            raise ValueError("data.path must not be empty")
        from nvp_dist.data.manifest import runs_a_command

        if runs_a_command(self.path) and not self.allow_shell_paths:
            raise ValueError(f"data.path={self.path} would be opened by running a shell command (webdataset's "
                             "gopen); set data.allow_shell_paths=true if you trust it")
        if not self.train_split or not self.eval_split:
            raise ValueError("data.train_split and data.eval_split must not be empty")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"data.transform must be one of {', '.join(TRANSFORMS)}, not {self.transform!r}")
        if self.cond not in CONDS:
            raise ValueError(f"data.cond must be one of {', '.join(CONDS)}, not {self.cond!r}")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.shuffle_buffer < 1:
            raise ValueError("data.shuffle_buffer must be >= 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError("data.max_bad_fraction must lie in [0, 1]")
        if self.bad_min_seen < 1:
            raise ValueError("data.bad_min_seen must be >= 1")
