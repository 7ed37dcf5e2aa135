"""The on-disk format of a sharded data set: `manifest.json` next to `{split}-NNNNNN.tar` shards.

Every sample of a split has the key `f"{index:08d}"` (its index in the split), so a reader can tell where
it is in the split from the key alone, and a missing or reordered sample shows up as a key mismatch.
Each shard records the byte offset of every `index_every`-th sample: readers seek straight to a piece of
a shard instead of reading it from the start, which keeps resuming and random piece draws cheap.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from webdataset.gopen import gopen

FORMAT_VERSION = 1
HTTP_TIMEOUT_S = 60
MANIFEST_NAME = "manifest.json"
COND_KINDS = ("none", "class", "attributes")
SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class DataError(RuntimeError):
    """Data that cannot be read as promised: missing manifest, unknown split, too many bad samples."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name relative to the data directory, e.g. "train-000003.tar"
    num_samples: int
    bytes: int
    sha256: str
    offsets: list[int]  # byte offset of samples 0, index_every, 2 * index_every, ... of this shard


@dataclass(frozen=True)
class SplitInfo:
    # (C, H, W) as stored; H and W are None when the images of the split differ in size (LSUN, folders).
    image_shape: tuple[int, int | None, int | None]
    shards: list[ShardInfo]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


@dataclass(frozen=True)
class Manifest:
    dataset: str  # e.g. "digits", "cifar10", "lsun-bedroom"
    source_format: str  # the reader that wrote it: cifar10 | imagenet | lsun | celeba | folder | digits
    cond_kind: str  # none | class (.cls members) | attributes (.json members with "attributes")
    cond_names: list[str]  # class names or attribute names; [] when cond_kind is none
    index_every: int
    splits: dict[str, SplitInfo]
    location: str = field(default="", compare=False)  # where it was read from; not stored
    format_version: int = FORMAT_VERSION

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"split {name!r} is not in the manifest at {self.location or '?'}; "
                            f"it has: {', '.join(sorted(self.splits))}")
        return self.splits[name]

    def image_shape(self, split: str) -> tuple[int, int | None, int | None]:
        return self.split(split).image_shape

    def num_samples(self, split: str) -> int:
        return self.split(split).num_samples

    def shard_url(self, shard: ShardInfo) -> str:
        return join_url(self.location, shard.name)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("location")
        return json.dumps(data, indent=1)


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def runs_a_command(url: str) -> bool:
    """True for what only webdataset's gopen reads: pipe: runs its text in a shell, and its other schemes
    (gs://, s3://, sftp://...) run curl, gsutil or aws with the URL in a shell command line."""
    return not is_local(url) and not url.startswith(("http://", "https://"))


def open_url(url: str, offset: int = 0) -> IO[bytes]:
    """Read `url` from byte `offset`: a local file (seek), http(s) (a Range request), or anything else
    webdataset's gopen reads (pipe:, gs://..., whose bytes before `offset` are read and dropped)."""
    if is_local(url):
        f = open(url, "rb")
        f.seek(offset)
        return f
    if url.startswith(("http://", "https://")):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        f = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT_S)
        if f.status == 206:
            return f
        # 200: the server ignored the range and sends the whole file
    else:
        f = gopen(url, "rb")
    while offset > 0:
        dropped = len(f.read(min(offset, 1 << 20)))
        if not dropped:
            break
        offset -= dropped
    return f


def read_manifest(path: str | Path) -> Manifest:
    """Read and check `path/manifest.json`; raise DataError naming the path when missing or invalid."""
    location = str(path)
    url = join_url(location, MANIFEST_NAME)
    if is_local(location) and not Path(url).is_file():
        raise DataError(f"no data set at {location}: {url} does not exist "
                        f"(write one with `nvp-dist shards SOURCE INPUT {location}`)")
    try:
        with open_url(url) as f:
            raw = json.loads(f.read())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}")
        splits = {
            name: SplitInfo(tuple(s["image_shape"]), [ShardInfo(**shard) for shard in s["shards"]])
            for name, s in raw.pop("splits").items()
        }
        manifest = Manifest(**raw, splits=splits, location=location)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"invalid manifest {url}: {err}") from err
    for split in manifest.splits.values():
        for shard in split.shards:  # joined to the data set's URL: a name must not change its scheme
            if not SHARD_NAME.match(shard.name):
                raise DataError(f"invalid manifest {url}: shard name {shard.name!r} is not a plain file name")
    if manifest.cond_kind not in COND_KINDS:
        raise DataError(f"invalid manifest {url}: cond_kind {manifest.cond_kind!r}")
    return manifest


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_rename(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it to `final` and fsync the directory: after a crash `final` is either the old
    file or the complete new one, never a prefix."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_manifest(manifest: Manifest, out_dir: Path) -> Path:
    final = out_dir / MANIFEST_NAME
    tmp = out_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(manifest.to_json())
    atomic_rename(tmp, final)
    return final


def verify_shards(path: str | Path) -> list[str]:
    """Re-hash every shard of a local data set against its manifest; return one line per problem."""
    if not is_local(str(path)):  # and never a pipe: command line, which read_manifest would run
        raise DataError(f"{path}: --verify checks a local data set directory")
    manifest = read_manifest(path)
    problems = []
    for split_name, split in manifest.splits.items():
        for shard in split.shards:
            file = Path(path) / shard.name
            if not file.is_file():
                problems.append(f"{split_name}: {shard.name} is missing")
                continue
            size = file.stat().st_size
            digest = sha256_file(file)
            if size != shard.bytes:
                problems.append(f"{split_name}: {shard.name} has {size} bytes, manifest says {shard.bytes}")
            if digest != shard.sha256:
                problems.append(f"{split_name}: {shard.name} sha256 {digest} != manifest {shard.sha256}")
    return problems
