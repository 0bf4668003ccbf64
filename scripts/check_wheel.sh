#!/usr/bin/env bash
# The package as a user gets it: the sdist and wheel built and checked (twine), the wheel
# installed into a fresh virtual environment outside the repository (not editable), and, from
# a folder outside the repository, `fewshot --version`, `fewshot methods`, a sinusoid training
# and its `fewshot eval`; with Omniglot's zips in $FEWSHOT_DATA_ROOT, the README's Omniglot
# commands in small sizes: train, eval (and with F), compare, and adapt to a folder of the
# user's images. Nothing may read the repository. Run by .ci/run after the tests:
#
#   [FEWSHOT_DATA_ROOT=DIR] bash scripts/check_wheel.sh [PYTHON]   # PYTHON: with build, twine
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-$repo/.venv/bin/python}"
omniglot="${FEWSHOT_DATA_ROOT:+$(cd "$FEWSHOT_DATA_ROOT" && pwd)}"  # absolute: we leave for $work
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
if [ -n "$omniglot" ]; then
    quick=(--dataset omniglot --data-root "$omniglot" --iterations 20 --val-every 10
           --val-episodes 5 --test-episodes 10)
    "$fewshot" train --algorithm protonet "${quick[@]}" --out proto
    "$fewshot" train --algorithm maml --first-order "${quick[@]}" --out maml
    "$fewshot" eval proto --data-root "$omniglot" --episodes 5 --json
    "$fewshot" eval proto --data-root "$omniglot" --episodes 3 --finetune-steps 2 --finetune-lr 0.001
    "$fewshot" compare proto maml --data-root "$omniglot" --episodes 5
    "$work/venv/bin/python" - <<'PY'  # a user's own images: two classes of two drawings
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for name in ("alpha/1.png", "alpha/2.png", "beta/1.png", "beta/2.png", "new.png"):
    path = Path("support") / name if name != "new.png" else Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(path)
PY
    "$fewshot" adapt proto --support support --predict new.png
fi
echo "the installed wheel works"
