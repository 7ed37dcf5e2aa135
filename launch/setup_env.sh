# Sourced by launch/test.sh and launch/demo.sh: create .venv once and install nvp-dist with its dev extra.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build first: an unpinned torch would pull
# a multi-GB CUDA wheel that such a machine cannot use.
set -euo pipefail
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.nvp-dist-installed
want=$(cat pyproject.toml launch/setup_env.sh | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  python -m pip install -q --upgrade pip
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0"
  fi
  python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}
export RAY_USAGE_STATS_ENABLED=0
