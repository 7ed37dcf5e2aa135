#!/usr/bin/env bash
# Install Debian packages for the tests when any of the commands they provide is missing:
#   bash launch/install_debian.sh prometheus,promtool prometheus          (the monitoring tests)
#   bash launch/install_debian.sh chromium,chromedriver chromium chromium-driver   (the page test)
# The tests run this from their session fixtures, so a fresh CI machine needs no manual step; it needs
# apt and root (or sudo). A no-op once installed.
set -euo pipefail
commands=$1
shift
missing=0
IFS=, read -r -a wanted <<< "$commands"
for cmd in "${wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing=1
done
if [[ $missing -eq 0 ]]; then
  exit 0
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  sudo=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
install=("${sudo[@]}" apt-get install -y -q --no-install-recommends "$@")
# A fresh machine may have no package lists yet: update only when the first try fails.
if ! "${install[@]}"; then
  "${sudo[@]}" apt-get update -q
  "${install[@]}"
fi
