"""Write a `Source` as size-bounded WebDataset shards plus `manifest.json`.

Each sample is `{key}.{png|jpg|webp}` (original bytes where the source had JPEG/PNG/WebP, PNG otherwise),
`{key}.cls` (the class index, when the source has classes) and `{key}.json` (`{"id": source id}` plus
`"attributes"` for CelebA). Shards are written under a temporary name and renamed once complete and
fsynced; the manifest is written last, the same way, so a crash leaves no half-written file under a
final name and no manifest that promises shards that do not exist.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from nvp_dist.data.manifest import (
    FORMAT_VERSION, Manifest, ShardInfo, SplitInfo, atomic_rename, sha256_file, write_manifest)
from nvp_dist.data.sources import Record, Source

log = logging.getLogger("nvp_dist.data")

DEFAULT_MAX_SHARD_BYTES = 500 * 1000 * 1000
DEFAULT_INDEX_EVERY = 64
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}
TAR_BLOCK = 512


class UnreadableImage(ValueError):
    """A source record whose bytes are missing or are not an image PIL can open."""


@dataclass
class PreparedImage:
    ext: str
    data: bytes
    grayscale: bool
    height: int
    width: int


def prepare_image(record: Record) -> PreparedImage:
    """Keep JPEG/PNG/WebP bytes as they are; re-encode anything else (BMP, GIF, TIFF...) as PNG. Only the
    header is parsed for kept formats: decoding every image here would double the conversion time."""
    try:
        data = record.data.read_bytes() if isinstance(record.data, Path) else record.data
        with Image.open(io.BytesIO(data)) as img:
            grayscale = img.mode in GRAYSCALE_MODES
            width, height = img.size
            ext = KEPT_FORMATS.get(img.format)
            if ext is None:
                buf = io.BytesIO()
                img.convert("L" if grayscale else "RGB").save(buf, format="PNG")
                ext, data = "png", buf.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{record.source_id}: {err}") from err
    return PreparedImage(ext, data, grayscale, height, width)


def _tar_bytes(members: dict[str, bytes]) -> int:
    """Bytes the sample takes in the tar: one header block per member plus its data padded to blocks."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for v in members.values())


def _closed_size(offset: int) -> int:
    """File size once closed at `offset`: two zero blocks end the archive, padded to a whole record."""
    return -(-(offset + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


@dataclass
class _SplitWriter:
    """Writes one split's shards, rotating to a new shard before one would exceed `max_shard_bytes`."""
    out_dir: Path
    split: str
    max_shard_bytes: int
    index_every: int
    shards: list[ShardInfo] = field(default_factory=list)
    _file: BinaryIO | None = None
    _tar: TarWriter | None = None
    _offsets: list[int] = field(default_factory=list)
    _count: int = 0

    def _name(self) -> str:
        return f"{self.split}-{len(self.shards):06d}.tar"

    def _tmp(self) -> Path:
        return self.out_dir / f".{self._name()}.tmp"

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is not None and self._count and (
                _closed_size(self._tar.tarstream.offset + _tar_bytes(members)) > self.max_shard_bytes):
            self.close_shard()
        if self._tar is None:
            self._file = open(self._tmp(), "wb")
            # A fixed mtime makes shards byte-reproducible, so re-running a conversion gives equal hashes.
            self._tar = TarWriter(self._file, encoder=False, mtime=0)
            self._offsets, self._count = [], 0
        if self._count % self.index_every == 0:
            # TarFile.offset is the logical position in the archive, past any buffered bytes.
            self._offsets.append(self._tar.tarstream.offset)
        self._tar.write({"__key__": key, **members})
        self._count += 1

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        tmp, final = self._tmp(), self.out_dir / self._name()
        info = ShardInfo(final.name, self._count, tmp.stat().st_size, sha256_file(tmp), self._offsets)
        atomic_rename(tmp, final)
        self.shards.append(info)
        self._tar = self._file = None

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); completed shards stay."""
        if self._tar is None:
            return
        try:
            self._tar.close()  # flushes tarfile's buffer now rather than at garbage collection
        except OSError:
            pass  # the write that failed (a full disk...) is what is being aborted
        finally:
            self._file.close()
            self._tmp().unlink(missing_ok=True)
            self._tar = self._file = None


def write_shards(source: Source, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 index_every: int = DEFAULT_INDEX_EVERY, progress: bool = True) -> Manifest:
    """Write every split of `source` to `out_dir` and return the manifest written there. Unreadable
    source images are skipped and logged (logger "nvp_dist.data")."""
    if index_every < 1 or max_shard_bytes < tarfile.RECORDSIZE:
        raise ValueError(f"index_every must be >= 1 and max_shard_bytes >= {tarfile.RECORDSIZE}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split_name, split_source in sorted(source.splits.items()):
        writer = _SplitWriter(out_dir, split_name, max_shard_bytes, index_every)
        channels, sizes, skipped, index = set(), set(), 0, 0
        bar = tqdm(split_source.records(), total=split_source.count, unit="img", desc=split_name,
                   disable=not progress, dynamic_ncols=True)
        try:
            for record in bar:
                try:
                    image = prepare_image(record)
                except UnreadableImage as err:
                    skipped += 1
                    log.warning("skipping unreadable source image %s", err)
                    continue
                members = {image.ext: image.data}
                if record.label is not None:
                    members["cls"] = str(record.label).encode()
                meta = {"id": record.source_id}
                if record.attributes is not None:
                    meta["attributes"] = record.attributes
                members["json"] = json.dumps(meta).encode()
                writer.write(f"{index:08d}", members)
                index += 1
                channels.add(1 if image.grayscale else 3)
                sizes.add((image.height, image.width))
                bar.set_postfix(shards=len(writer.shards) + 1, refresh=False)
            writer.close_shard()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        if skipped:
            log.warning("%s: skipped %d unreadable source images of %d", split_name, skipped, index + skipped)
        height, width = sizes.pop() if len(sizes) == 1 else (None, None)
        splits[split_name] = SplitInfo((max(channels, default=3), height, width), writer.shards)
    manifest = Manifest(source.dataset, source.source_format, source.cond_kind, list(source.cond_names),
                        index_every, splits, location=str(out_dir), format_version=FORMAT_VERSION)
    write_manifest(manifest, out_dir)
    _remove_stale_shards(out_dir, manifest)
    return manifest


def _remove_stale_shards(out_dir: Path, manifest: Manifest) -> None:
    """Delete shards of an earlier conversion into the same folder that the new manifest does not list
    (the earlier one had more shards), so that globbing the folder finds only the current set."""
    listed = {shard.name for split in manifest.splits.values() for shard in split.shards}
    for path in out_dir.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if path.name.rsplit("-", 1)[0] in manifest.splits and path.name not in listed:
            log.info("removing %s, a shard of an earlier conversion", path)
            path.unlink()
