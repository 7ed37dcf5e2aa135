"""Checkpoints: DeepSpeed's sharded engine state plus nvp-dist's own state, written atomically.

Layout under `{out_dir}/checkpoints/`:
  stepNNNNNNNN/          DeepSpeed's files for every rank, `nvp_state.pt` (step, config, format version,
                         EMA weights), `rng_rank{r}.pt`, and last `MANIFEST.json` (size and sha256 of
                         every file): a directory without a matching manifest is not a checkpoint.
  latest                 the newest complete tag, replaced atomically.
A save goes to `stepNNNNNNNN.tmp/`; once every rank has written, rank 0 fsyncs its files, manifest and
directories, then renames it into place (fsyncing the parent after each rename), so a crash or power loss
at any point leaves the previous checkpoint valid. Re-saving a step that exists (after a resume that fell
back past a damaged one) first renames the old directory to `stepNNNNNNNN.old`, removed only once the new
one is in place; `recover()` on the next start puts it back if the new one never landed and removes
leftover `.tmp`. The checkpoint directory must be shared by all nodes (the Kubernetes manifests mount one
volume), since rank 0 verifies and renames.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from nvp_dist.train import safe_load
from nvp_dist.train.fsutil import atomic_write, fsync_dir

# 2: RNG states stored as tensors and plain values (format 1 pickled numpy's state), so that every file
# of a checkpoint loads with the weights-only unpickler.
FORMAT_VERSION = 2
log = logging.getLogger("nvp_dist.train")
TAG = re.compile(r"^step\d{8}$")
# Test hook: NVP_CHECKPOINT_FAULT=STAGE or STAGE@STEP ends rank 0 (os._exit, no clean-up) at that point of
# finalize(), as a kill or power loss there would. Stages in order: written (every rank's files are in
# .tmp, nothing synced), synced (files, manifest and directory fsynced), old_moved (an existing checkpoint
# of the same step set aside as .old), renamed (.tmp renamed into place), latest (`latest` replaced).
FAULT_ENV = "NVP_CHECKPOINT_FAULT"
FAULT_STAGES = ("written", "synced", "old_moved", "renamed", "latest")
FAULT_EXIT = 99


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        if fsync:  # written by DeepSpeed's or torch's save, which do not sync
            os.fsync(f.fileno())
    return h.hexdigest()


def _fault_point(stage: str, step: int) -> None:
    want = os.environ.get(FAULT_ENV)
    if want and want in (stage, f"{stage}@{step}"):
        log.error("%s=%s: ending the process here", FAULT_ENV, want)
        logging.shutdown()
        os._exit(FAULT_EXIT)


def _files(d: Path) -> List[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != "MANIFEST.json")


def write_manifest(d: Path) -> None:
    """Hash and fsync every file under `d`, then write MANIFEST.json and fsync `d` and its subdirectories."""
    entries = {str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
               for p in _files(d)}
    atomic_write(d / "MANIFEST.json", json.dumps({"format_version": FORMAT_VERSION, "files": entries}, indent=1))
    for sub in sorted(p for p in d.rglob("*") if p.is_dir()):
        fsync_dir(sub)


def verify(d: Path, hashes: bool = True) -> Optional[str]:
    """None if `d` is a complete checkpoint, else what is wrong with it. `hashes=False` checks the manifest,
    the files and their sizes only: what a truncated or interrupted copy shows, without reading gigabytes."""
    manifest = d / "MANIFEST.json"
    if not manifest.is_file():
        return "no MANIFEST.json (an interrupted save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable MANIFEST.json: {err}"
    for rel, meta in files.items():
        p = d / rel
        if not p.is_file():
            return f"missing {rel}"
        if p.stat().st_size != meta["size"]:
            return f"{rel} has {p.stat().st_size} bytes, manifest says {meta['size']}"
        if hashes and _sha256(p) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def checkpoint_tags(root: Path) -> List[str]:
    """Complete-looking tags (not .tmp or .old), newest first."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and TAG.match(p.name)), reverse=True)


def newest_valid(root: Path) -> Optional[str]:
    for tag in checkpoint_tags(root):
        problem = verify(root / tag)
        if problem is None:
            return tag
        log.warning("checkpoint %s is not usable (%s); falling back to an older one", root / tag, problem)
    return None


def finalize(root: Path, step: int, keep: int) -> Path:
    """Rank 0, after every rank has written: manifest, rename into place, point `latest`, prune. At every
    point a complete checkpoint exists under its own name or, for a re-save of one step, as `.old`."""
    tmp, final, old = root / (tag_for(step) + ".tmp"), root / tag_for(step), root / (tag_for(step) + ".old")
    _fault_point("written", step)
    write_manifest(tmp)
    _fault_point("synced", step)
    if final.exists():  # a re-save of the same step after a resume: keep the old one until the new one is in
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        fsync_dir(root)
        _fault_point("old_moved", step)
    os.replace(tmp, final)
    fsync_dir(root)
    _fault_point("renamed", step)
    atomic_write(root / "latest", final.name)
    _fault_point("latest", step)
    shutil.rmtree(old, ignore_errors=True)
    prune(root, final.name, keep)
    return final


def prune(root: Path, current: str, keep: int) -> None:
    """Keep `current` (just written, what `latest` names) and the newest `keep - 1` older tags that look
    complete. Tags newer than `current` exist only when the run resumed from an older step (damaged ones
    `--resume auto` fell back past, or an explicit `--resume` of an older tag): a later `--resume auto` must
    not jump back to them, so damaged ones are removed and intact ones set aside as `<tag>.superseded`
    (never deleted: they are the user's). Damaged older tags are removed rather than holding a kept slot.
    The check is `verify(hashes=False)`: a save must not re-read gigabytes of older checkpoints; loading
    verifies the hashes."""
    wanted = max(keep, 1) - 1
    for tag in checkpoint_tags(root):
        if tag == current:
            continue
        problem = verify(root / tag, hashes=False)
        if tag > current and problem is None:  # same-width names: string order is step order
            aside = root / f"{tag}.superseded"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(root / tag, aside)
            log.warning("set %s aside as %s: newer than %s, which this run resumed before", root / tag, aside.name,
                        current)
            continue
        if tag < current and wanted and problem is None:
            wanted -= 1
            continue
        log.warning("removing checkpoint %s: %s", root / tag, problem or "beyond train.keep_checkpoints")
        shutil.rmtree(root / tag, ignore_errors=True)


def recover(root: Path) -> None:
    """Rank 0, on start: undo what a crash in finalize() left. A `.old` whose replacement never landed goes
    back under its name; other `.old` and every `.tmp` (an unfinished save) are removed."""
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.endswith(".old") and TAG.match(p.name[:-4]):
            tag = root / p.name[:-4]
            if tag.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, tag)
                log.warning("restored %s: the save that replaced it did not finish", tag)
        elif p.name.endswith(".tmp"):
            log.info("removing %s, left by an interrupted save", p)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    fsync_dir(root)


def rng_state() -> Dict[str, Any]:
    """This process's generators as tensors and plain values (loadable with weights_only=True)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {
        "format_version": FORMAT_VERSION, "torch": torch.get_rng_state(),
        "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    else:  # format 1: numpy's and Python's own tuples
        np.random.set_state(n)
        random.setstate(p)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_rng_state(path: Path) -> Dict[str, Any]:
    # Format 1 held numpy arrays: rebuilding arrays is allowed, and still no other code.
    return safe_load.load(path, allow=safe_load.numpy_array_globals())


def read_nvp_state(tag_dir: Path) -> Dict[str, Any]:
    state = safe_load.load(tag_dir / "nvp_state.pt")
    version = state.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise RuntimeError(f"{tag_dir} has checkpoint format {version}; this nvp-dist reads up to {FORMAT_VERSION}")
    return state
