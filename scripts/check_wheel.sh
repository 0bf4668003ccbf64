#!/usr/bin/env bash
# The package as a user gets it: the sdist and wheel built and checked (twine), the wheel
# installed into a fresh virtual environment outside the repository (not editable), and, from
# a folder outside the repository, `fewshot --version`, `fewshot methods`, a sinusoid training
# and its `fewshot eval`. Nothing may read the repository. Run by .ci/run after the tests:
#
#   bash scripts/check_wheel.sh [PYTHON]   # PYTHON: with build and twine (default .venv's)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-$repo/.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m build --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1 \
    || { cat "$work/build.log"; exit 1; }
"$python" -m twine check --strict "$work"/dist/*
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q -c "$repo/requirements/cpu-torch.txt" "$work"/dist/*.whl

cd "$work"  # outside the repository: the installed package alone
fewshot="$work/venv/bin/fewshot"
"$fewshot" --version
"$work/venv/bin/python" -c "import fewshot, pathlib; assert 'site-packages' in fewshot.__file__, fewshot.__file__; assert (pathlib.Path(fewshot.__file__).parent / 'py.typed').exists()"
"$fewshot" methods > methods.txt
"$fewshot" train --dataset sinusoid --iterations 300 --val-every 150 --val-episodes 10 \
    --test-episodes 20 --out run
"$fewshot" eval run --episodes 20
echo "the installed wheel works"
