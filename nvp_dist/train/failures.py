"""What a failed run exits with, and how its failure is described to the other ranks and the log.

Exit codes (README, "Exit codes"; the Kubernetes Job's podFailurePolicy follows them):
  0   done
  1   anything else (a crash, no space for a checkpoint, a peer that died): worth a retry
  2   configuration or data error (bad config, missing or unfit data, too many bad samples, a metrics
      address that cannot be bound): a retry would fail the same way
  3   training diverged (train.max_consecutive_skips non-finite steps in a row)
  143 stopped by SIGTERM or SIGINT after writing a checkpoint
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Optional

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_DIVERGED, EXIT_STOPPED = 0, 1, 2, 3, 143
NO_SPACE = {errno.ENOSPC: "ENOSPC", errno.EFBIG: "EFBIG, the file size limit", errno.EDQUOT: "EDQUOT, the disk quota"}


def exit_code(err: BaseException) -> int:
    from nvp_dist.config import ConfigError
    from nvp_dist.data import DataError
    from nvp_dist.train.trainer import TrainingDiverged

    if isinstance(err, (ConfigError, DataError)):
        return EXIT_CONFIG
    if isinstance(err, TrainingDiverged):
        return EXIT_DIVERGED
    return EXIT_FAILED


def record_exit(code: int) -> None:
    """Leave this rank's exit code in $NVP_EXIT_DIR/rank<N>, if set, just before it exits. The deepspeed
    launcher exits 1 when it is signalled itself, whatever its ranks exit with: a wrapper of it
    (k8s/base/train.sh) reads these files to exit 143 after a checkpointed SIGTERM, not 1."""
    directory = os.environ.get("NVP_EXIT_DIR")
    if not directory:
        return
    from nvp_dist.train.distributed import read_env

    path = Path(directory) / f"rank{read_env().rank}"
    tmp = path.with_name(f".{path.name}.tmp")  # renamed into place: a rank killed mid-write leaves no file
    try:
        tmp.write_text(f"{code}\n")
        os.replace(tmp, path)
    except OSError as err:  # never worth changing the exit code for: the wrapper falls back to the launcher's
        print(f"nvp-dist train: could not record exit code {code} in {directory}: {err}", file=sys.stderr)


def describe(err: BaseException, saving: Optional[Path] = None) -> str:
    """The error as one line; a write that failed for want of space says "no space" and where."""
    text = f"{type(err).__name__}: {err}"
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return f"no space left writing {e.filename or saving or 'a file'} ({NO_SPACE[e.errno]}): {text}"
    if saving is not None:
        # torch.save and DeepSpeed's writers raise a RuntimeError without the errno ("file write failed",
        # "unexpected pos"): ask the file system directly.
        cause = space_problem(saving)
        if cause:
            return f"no space left writing checkpoint {saving} ({cause}): {text}"
        return f"writing checkpoint {saving} failed: {text}"
    return text


def space_problem(directory: Path, probe_bytes: int = 4 << 20) -> Optional[str]:
    """Why `directory` cannot take `probe_bytes` more (ENOSPC, EFBIG, EDQUOT), or None if it can."""
    directory = directory if directory.is_dir() else directory.parent
    probe = directory / f".space-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as err:
        return NO_SPACE.get(err.errno)
    try:
        chunk = b"\0" * (1 << 20)
        for _ in range(probe_bytes // len(chunk)):
            os.write(fd, chunk)
        os.fsync(fd)  # a filesystem that allocates lazily reports ENOSPC here
        return None
    except OSError as err:
        return NO_SPACE.get(err.errno)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _chain(err: Optional[BaseException]):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
