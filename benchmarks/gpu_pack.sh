#!/usr/bin/env bash
# Fill .gpu/ (ignored by git) with what benchmarks/gpu.sh needs on a GPU machine that reaches
# no network: Omniglot's two official zips and, from the peers venv, learn2learn and higher
# with the packages they import (for the speed rows against learn2learn). Run it here, then
# send the tree with `.gpu` carried and run `bash benchmarks/gpu.sh` there.
#
#   FEWSHOT_DATA_ROOT   folder with Omniglot's zips (default: ../shared/data/omniglot)
#   FEWSHOT_PEERS_VENV  the peers venv (default: benchmarks/.peers-venv, built if missing)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
data="${FEWSHOT_DATA_ROOT:-$repo/../shared/data/omniglot}"
venv="${FEWSHOT_PEERS_VENV:-$here/.peers-venv}"
[[ -x "$venv/bin/python" ]] || bash "$here/setup_peers.sh" >&2

rm -rf "$repo/.gpu"
mkdir -p "$repo/.gpu/omniglot" "$repo/.gpu/peers"
cp "$data/images_background.zip" "$data/images_evaluation.zip" "$repo/.gpu/omniglot/"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# What `import learn2learn, higher` loads beyond what the GPU machine has (torch, numpy,
# scipy, pillow, tqdm); torchvision is setup_peers.sh's import-only stub, which the GPU
# machine's own torchvision, if it has one, is not shadowed by (the peers go last on the path).
for package in learn2learn higher gym gym_notices requests urllib3 idna certifi \
    charset_normalizer cloudpickle torchvision; do
    # the package and its metadata (learn2learn reads its own version from it)
    for path in "$site/$package" "$site/$package"-*.dist-info; do
        if [[ -e $path ]]; then cp -r "$path" "$repo/.gpu/peers/"; fi
    done
done
find "$repo/.gpu" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$repo/.gpu"
