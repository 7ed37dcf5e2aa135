#!/usr/bin/env bash
# Install Debian's headless-capable browser (`chromium`, and `chromedriver` from chromium-driver) when
# missing. The page test runs this from its session fixture, so a fresh CI machine needs no manual step;
# it needs apt and root (or sudo). A no-op once installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  sudo=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
install=("${sudo[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver)
# A fresh machine may have no package lists yet: update only when the first try fails.
if ! "${install[@]}"; then
  "${sudo[@]}" apt-get update -q
  "${install[@]}"
fi
