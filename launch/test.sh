#!/usr/bin/env bash
# Set up .venv (idempotent) and run the test suite. This is the README's test command and what .ci/run calls.
#   bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
exec python -m pytest "$@"
