# Sourced by launch/test.sh and launch/demo.sh: create .venv once and install nvp-dist with its dev extra,
# every version pinned by constraints.txt (the versions CI tests). torch is installed first, in the build
# that fits the machine: without an NVIDIA GPU the CPU build (an unpinned torch would pull a multi-GB CUDA
# wheel that such a machine cannot use); with one, the CUDA build the driver supports (README, "GPUs").
set -euo pipefail
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.nvp-dist-installed
want=$(cat pyproject.toml launch/setup_env.sh constraints.txt | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  python -m pip install -q -c constraints.txt --upgrade pip setuptools
  torch_version=$(sed -n 's/^torch==//p' constraints.txt)
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    # The local label makes pip take PyTorch's CPU build, from its CPU index or a local wheel, and fail
    # rather than fall back to PyPI's CUDA build.
    python -m pip install -q -c constraints.txt "torch==${torch_version}+cpu" \
      --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  else
    # The newest CUDA build whose CUDA version the driver supports (nvidia-smi's "CUDA Version" is the
    # newest the driver runs). cu126 needs driver >= 560.28, cu128 >= 570.26, cu130 >= 580.65.
    driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1\2/p' | head -n1)
    cuda=${TORCH_CUDA:-}
    for build in 130 128 126; do
      if [[ -z $cuda && -n $driver_cuda && $driver_cuda -ge $build ]]; then cuda=cu$build; fi
    done
    if [[ -z $cuda ]]; then
      echo "setup_env: the NVIDIA driver supports CUDA '${driver_cuda:-unknown}'; torch ${torch_version} needs" \
           "CUDA 12.6 or newer (driver >= 560.28). Upgrade the driver, or set TORCH_CUDA=cu126|cu128|cu130." >&2
      return 1 2>/dev/null || exit 1
    fi
    echo "setup_env: torch ${torch_version}+${cuda} for a driver supporting CUDA ${driver_cuda:0:2}.${driver_cuda:2}"
    python -m pip install -q -c constraints.txt "torch==${torch_version}+${cuda}" \
      --extra-index-url "https://download.pytorch.org/whl/${cuda}"
  fi
  python -m pip install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}
export RAY_USAGE_STATS_ENABLED=0
