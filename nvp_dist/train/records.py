"""`metrics.jsonl`, the run's record of training and evaluation, one JSON object a line, appended by rank 0.

A kill can stop a write mid-line, and a resumed run replays the steps after its checkpoint: `truncate` on
start keeps the file readable line by line with one record per event and step.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

from nvp_dist.train.fsutil import atomic_write

log = logging.getLogger("nvp_dist.train")


def truncate(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (the checkpoint a run resumes from, 0 when it starts afresh):
    later ones will be recorded again by the steps the run replays. Lines that do not parse (the torn last
    line of a killed run) are dropped too. The file is replaced atomically, and only when something changes."""
    if not path.is_file():
        return
    raw = path.read_bytes()
    kept, torn, replayed = [], 0, 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if not isinstance(record, dict) or record.get("step", 0) > step:
            replayed += 1
            continue
        kept.append(line)
    text = b"".join(line + b"\n" for line in kept)
    if text == raw:
        return
    atomic_write(path, text)
    log.info("%s: dropped %d records after step %d and %d unreadable lines (a killed run's)", path, replayed,
             step, torn)


def read(path: Path) -> Iterator[dict]:
    """The records of `path` in order, skipping lines that do not parse (a killed run's torn last line)."""
    if not path.is_file():
        return
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def has_event(path: Path, event: str, step: int) -> bool:
    """Whether `path` holds a record of `event` at `step`."""
    return any(r.get("event") == event and r.get("step") == step for r in read(path))
