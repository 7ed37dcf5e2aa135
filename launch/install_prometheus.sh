#!/usr/bin/env bash
# Install Debian's prometheus package (the `prometheus` server and `promtool`) when either is missing.
# The monitoring tests run this from their session fixture, so a fresh CI machine needs no manual step;
# it needs apt and root (or sudo). About 15 s; a no-op once installed.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  sudo=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
install=("${sudo[@]}" apt-get install -y -q --no-install-recommends prometheus)
# A fresh machine may have no package lists yet: update only when the first try fails.
if ! "${install[@]}"; then
  "${sudo[@]}" apt-get update -q
  "${install[@]}"
fi
