"""Loading `.pt` files without running code: checkpoints, exported models and RNG states are user files.

Everything nvp-dist writes itself loads with `torch.load(weights_only=True)`. DeepSpeed's own files hold a
few of its classes and are read by DeepSpeed with the full unpickler, so `check_deepspeed_files` first loads
each of them with the weights-only unpickler, allowing those classes and nothing else: a file that passes
names no other global, so the full unpickler can then only call what the restricted one allowed.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Iterable

import torch


class UnsafeFileError(ValueError):
    """A file that is not plain weights: loading it would call code other than tensor rebuilding."""


def numpy_array_globals() -> list:
    # RNG files of checkpoint format 1 hold numpy's Mersenne Twister key as an array. Rebuilding an array
    # runs no code of the file's choosing (an object array's items go through the same restricted unpickler).
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def deepspeed_globals() -> list:
    """The classes DeepSpeed pickles into its optimizer and model state files (seen at ZeRO 0-3, fp32 and
    bf16): plain records, an enum and the loss scaler's settings."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def load(path: str | Path, allow: Iterable[Any] = (), mmap: bool = False) -> Any:
    """torch.load with the weights-only unpickler (plus the classes in `allow`), on CPU; UnsafeFileError
    naming the file and what it tried to load when it is anything else."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(f"refused to load {path}: it is not a plain weights file, and loading it could run "
                              f"code ({_first_line(err)})") from err
    except (RuntimeError, EOFError, AttributeError, TypeError) as err:
        raise UnsafeFileError(f"refused to load {path}: not a torch.save file of weights ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_deepspeed_files(tag_dir: Path) -> None:
    """Raise UnsafeFileError unless every `.pt` file of the checkpoint loads with the weights-only unpickler
    and DeepSpeed's own classes; memory-mapped, so the weights themselves are not read."""
    allowed = deepspeed_globals() + numpy_array_globals()
    for path in sorted(tag_dir.rglob("*.pt")):
        load(path, allow=allowed, mmap=True)
