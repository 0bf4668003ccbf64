#!/usr/bin/env bash
# One parity pair: benchmarks/parity/run.py with the peers venv's python (fewshot from src/,
# learn2learn 0.2.0 installed there), then report.py with the project's venv (matplotlib) to
# redraw docs/parity.md's table and the pair's figure. Arguments go to run.py, e.g.
#
#   bash benchmarks/parity/run.sh maml --iterations 100 --val-every 25 --out runs/parity-maml
#
#   FEWSHOT_PEERS_VENV  venv location (default: benchmarks/.peers-venv, see benchmarks/setup_peers.sh)
#   FEWSHOT_DATA_ROOT   folder with Omniglot's two zips (default: ../shared/data/omniglot)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$(dirname "$here")")"
venv="${FEWSHOT_PEERS_VENV:-$repo/benchmarks/.peers-venv}"
[[ -x "$venv/bin/python" ]] || bash "$repo/benchmarks/setup_peers.sh" >&2

if [[ -z ${FEWSHOT_DATA_ROOT:-} && -d "$repo/../shared/data/omniglot" ]]; then
    FEWSHOT_DATA_ROOT="$(cd "$repo/../shared/data/omniglot" && pwd)"
    export FEWSHOT_DATA_ROOT
fi

cd "$repo"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
"$venv/bin/python" "$here/run.py" "$@"
if [[ -x "$repo/.venv/bin/python" ]]; then
    "$repo/.venv/bin/python" "$here/report.py"
fi
