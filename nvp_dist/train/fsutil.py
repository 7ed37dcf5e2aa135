"""Durable file replacement, shared by checkpoints and `metrics.jsonl`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def fsync_dir(d: Path) -> None:
    """Make the names in `d` (new files, renames) durable; a file's own fsync does not cover them."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: Union[str, bytes]) -> None:
    """Replace `path` with `data`: written and fsynced under a temporary name, renamed, directory fsynced,
    so that a crash leaves either the old contents or the new, never a mix, and the rename survives."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
