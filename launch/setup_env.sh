# Sourced by launch/test.sh and launch/demo.sh: create .venv once and install nvp-dist with its dev extra,
# every version pinned by constraints.txt (the versions CI tests). torch is installed first, in the build
# that fits the machine: without an NVIDIA GPU the CPU build (an unpinned torch would pull a multi-GB CUDA
# wheel that such a machine cannot use); with one, the CUDA build the driver supports (README, "GPUs").
set -euo pipefail
PY=${PYTHON:-python3}
# A venv whose creation was interrupted has a python but no activate script: make it again.
if [[ ! -x .venv/bin/python || ! -f .venv/bin/activate ]]; then
  "$PY" -m venv --clear .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.nvp-dist-installed
want=$(cat pyproject.toml launch/setup_env.sh launch/torch_build.sh constraints.txt | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  python -m pip install -q -c constraints.txt --upgrade pip setuptools
  torch_version=$(sed -n 's/^torch==//p' constraints.txt)
  build=$(bash launch/torch_build.sh)  # cpu, or the CUDA build the driver supports; fails on an old driver
  if [[ $build == cpu ]]; then
    # The local label makes pip take PyTorch's CPU build, from its CPU index or a local wheel, and fail
    # rather than fall back to PyPI's CUDA build.
    python -m pip install -q -c constraints.txt "torch==${torch_version}+cpu" \
      --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  else
    echo "setup_env: torch ${torch_version}+${build} for this machine's NVIDIA driver"
    python -m pip install -q -c constraints.txt "torch==${torch_version}+${build}" \
      --extra-index-url "https://download.pytorch.org/whl/${build}"
  fi
  python -m pip install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}
export RAY_USAGE_STATS_ENABLED=0
