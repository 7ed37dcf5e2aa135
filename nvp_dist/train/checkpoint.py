"""Checkpoints: DeepSpeed's sharded engine state plus nvp-dist's own state, written atomically.

Layout under `{out_dir}/checkpoints/`:
  stepNNNNNNNN/          DeepSpeed's files for every rank, `nvp_state.pt` (step, config, format version,
                         EMA weights), `rng_rank{r}.pt`, and last `MANIFEST.json` (size and sha256 of
                         every file): a directory without a matching manifest is not a checkpoint.
  latest                 the newest complete tag, replaced atomically.
A save goes to `stepNNNNNNNN.tmp/` and is renamed once every rank has written, so a crash mid-save leaves
the previous checkpoint valid and `latest` pointing at it. The checkpoint directory must be shared by
all nodes (the Kubernetes manifests mount one volume), since rank 0 verifies and renames.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from nvp_dist.train import safe_load

# 2: RNG states stored as tensors and plain values (format 1 pickled numpy's state), so that every file
# of a checkpoint loads with the weights-only unpickler.
FORMAT_VERSION = 2
log = logging.getLogger("nvp_dist.train")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(d: Path) -> List[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != "MANIFEST.json")


def write_manifest(d: Path) -> None:
    entries = {str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(d)}
    tmp = d / "MANIFEST.json.tmp"
    tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, "files": entries}, indent=1))
    os.replace(tmp, d / "MANIFEST.json")


def verify(d: Path) -> Optional[str]:
    """None if `d` is a complete checkpoint, else what is wrong with it."""
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
        if _sha256(p) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def checkpoint_tags(root: Path) -> List[str]:
    """Complete-looking tags (not .tmp), newest first."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step")
                   and not p.name.endswith(".tmp")), reverse=True)


def newest_valid(root: Path) -> Optional[str]:
    for tag in checkpoint_tags(root):
        problem = verify(root / tag)
        if problem is None:
            return tag
        log.warning("checkpoint %s is not usable (%s); falling back to an older one", root / tag, problem)
    return None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def finalize(root: Path, step: int, keep: int) -> Path:
    """Rank 0, after every rank has written: manifest, rename into place, point `latest`, prune."""
    tmp, final = root / (tag_for(step) + ".tmp"), root / tag_for(step)
    write_manifest(tmp)
    if final.exists():  # a re-save of the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    for old in checkpoint_tags(root)[keep:]:
        shutil.rmtree(root / old, ignore_errors=True)
    return final


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
