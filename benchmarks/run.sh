#!/usr/bin/env bash
# The one command for fewshot's benchmark: makes sure the peers venv (torch, learn2learn,
# higher) is built and passes its smoke check, then runs benchmarks/run.py with that venv's
# python and fewshot imported from src/, so every library runs on the same torch. Arguments
# go to run.py (e.g. --quick, --device cuda, --malloc default).
#
#   FEWSHOT_PEERS_VENV  venv location (default: benchmarks/.peers-venv)
#   FEWSHOT_DATA_ROOT   folder with Omniglot's two zips (default: ../shared/data/omniglot
#                       beside the checkout, where the project keeps them)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
venv="${FEWSHOT_PEERS_VENV:-$here/.peers-venv}"

# setup_peers.sh's progress goes to stderr, so stdout carries only the results table.
bash "$here/setup_peers.sh" >&2

if [[ -z ${FEWSHOT_DATA_ROOT:-} && -d "$repo/../shared/data/omniglot" ]]; then
    FEWSHOT_DATA_ROOT="$(cd "$repo/../shared/data/omniglot" && pwd)"
    export FEWSHOT_DATA_ROOT
fi

cd "$repo"
PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" exec "$venv/bin/python" "$here/run.py" "$@"
