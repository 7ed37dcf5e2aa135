#!/usr/bin/env bash
# The one-command device check (benchmarks/device_check.py): GPU smoke tests and one table of images/s,
# MFU and peak memory, written to $OUT/device_check.md and printed.  bash benchmarks/device_check.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
exec python benchmarks/device_check.py "$@"
