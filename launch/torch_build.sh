#!/usr/bin/env bash
# Prints the torch build launch/setup_env.sh installs on this machine: "cpu" without nvidia-smi (never a
# CUDA build there), else the newest CUDA build the driver supports (nvidia-smi's "CUDA Version" is the
# newest it runs): cu130 needs driver >= 580.65, cu128 >= 570.26, cu126 >= 560.28. TORCH_CUDA overrides it
# on a GPU machine. Exits 1, saying why, for a driver older than CUDA 12.6.
set -euo pipefail
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo cpu
  exit 0
fi
if [[ -n ${TORCH_CUDA:-} ]]; then
  echo "$TORCH_CUDA"
  exit 0
fi
driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' | head -n1)
if [[ -n $driver_cuda ]]; then
  major=${driver_cuda%%.*} minor=${driver_cuda#*.}
  for build in 13.0 12.8 12.6; do  # compared as major * 100 + minor (a 12.10 sorts above 12.8)
    if (( major * 100 + minor >= ${build%.*} * 100 + ${build#*.} )); then
      echo "cu${build/./}"
      exit 0
    fi
  done
fi
echo "torch_build: the NVIDIA driver supports CUDA '${driver_cuda:-unknown}'; nvp-dist's torch needs CUDA 12.6" \
     "or newer (driver >= 560.28). Upgrade the driver, or set TORCH_CUDA=cu126|cu128|cu130." >&2
exit 1
