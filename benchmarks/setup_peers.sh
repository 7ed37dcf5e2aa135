#!/usr/bin/env bash
# The peers' own environment for bench_train.py: normflows and FrEIA from PyPI, next to (not inside) the
# project's .venv so that neither can change the other's packages.
#     bash benchmarks/setup_peers.sh            # -> benchmarks/.venv-peers
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PEERS_VENV:-$here/.venv-peers}"
python3 -m venv "$venv"
# torch first and pinned: the peers depend on an unpinned torch, which would pull the multi-GB CUDA build;
# with this version already present pip keeps it (the CPU wheel, the same build as the project's .venv).
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet normflows FrEIA psutil
"$venv/bin/python" -c "from importlib.metadata import version as v; import normflows, FrEIA; \
print('peers venv ready: torch', v('torch'), 'normflows', v('normflows'), 'FrEIA', v('FrEIA'))"
