"""Init container of the training pods: wait until the data Job's manifest is there, then refuse a partial
data set (exit 2, which the Job's podFailurePolicy fails the run on instead of retrying).

The data Job writes manifest.json last, atomically (nvp_dist/data/writer.py), so a manifest that is
absent means "not yet"; one that is unreadable, or names a shard that is missing or of another size, is a
broken data set that waiting will not mend. Sizes, not hashes: `nvp-dist shards --verify` re-hashes every
shard, which on ImageNet-sized data would cost every restart of every pod minutes.
"""
import os
import sys
import time
from pathlib import Path

from nvp_dist.data.manifest import DataError, read_manifest

CONFIG_ERROR = 2  # launch/train.py's exit code for a bad config or data (README, Exit codes)


def problems(data: Path) -> list[str]:
    try:
        manifest = read_manifest(data)
    except DataError as err:
        return [f"unreadable manifest: {err}"]
    found = []
    for name, split in manifest.splits.items():
        for shard in split.shards:
            path = data / shard.name
            if not path.is_file():
                found.append(f"{name}: {shard.name} is missing")
            elif (size := path.stat().st_size) != shard.bytes:
                found.append(f"{name}: {shard.name} has {size} bytes, the manifest says {shard.bytes}")
    return found


def main() -> int:
    data = Path(os.environ["DATA_PATH"])
    deadline = time.monotonic() + float(os.environ.get("DATA_WAIT_S", "0"))
    while not (data / "manifest.json").is_file():
        if time.monotonic() >= deadline:
            print(f"check-data: no {data}/manifest.json: run the data Job first (README, Kubernetes)",
                  file=sys.stderr)
            return CONFIG_ERROR
        time.sleep(10)
    found = problems(data)
    for line in found:
        print(f"check-data: {line}", file=sys.stderr)
    if found:
        return CONFIG_ERROR
    print(f"check-data: {data} matches its manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
