#!/usr/bin/env bash
# One command for a GPU machine, at most 8 minutes: trains the Omniglot 5-way 1-shot zoo rows
# farthest from their papers (four trainings side by side on the one GPU, each a small
# network that leaves the GPU mostly idle alone), scores each on the 600 test episodes, then
# reruns the speed benchmark against learn2learn with --device cuda on the idle GPU.
#
#   bash benchmarks/gpu_pack.sh        # here, once: Omniglot and the peers into .gpu/
#   bash benchmarks/gpu.sh             # there, with .gpu carried
#
# Results go to $OUT (or runs/gpu/out): machine.txt, scores.jsonl (one `fewshot eval --json`
# line a row), bench.md and bench.json, and runs.tar.gz (the run folders, to become zoo rows).
#
#   FEWSHOT_GPU_DEVICE   device of every run (default cuda; `cpu` for a smoke run here)
#   FEWSHOT_GPU_MINUTES  each training's time limit in minutes (default 4)
#   FEWSHOT_GPU_BENCH    `full`, `quick` or `none` (default full)
#   FEWSHOT_GPU_EPISODES test episodes of each score (default 600, the protocol)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"
device="${FEWSHOT_GPU_DEVICE:-cuda}"
minutes="${FEWSHOT_GPU_MINUTES:-4}"
bench="${FEWSHOT_GPU_BENCH:-full}"
episodes="${FEWSHOT_GPU_EPISODES:-600}"
out="${OUT:-$repo/runs/gpu/out}"
runs="$repo/runs/gpu"
mkdir -p "$out" "$runs"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z ${FEWSHOT_DATA_ROOT:-} ]]; then
    for candidate in "$repo/.gpu/omniglot" "$repo/../shared/data/omniglot"; do
        if [[ -f $candidate/images_background.zip ]]; then
            FEWSHOT_DATA_ROOT="$candidate"
            break
        fi
    done
fi
export FEWSHOT_DATA_ROOT="${FEWSHOT_DATA_ROOT:?no Omniglot zips: run benchmarks/gpu_pack.sh and carry .gpu}"

{
    date -u
    python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    if [[ $device == cuda ]]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
} | tee "$out/machine.txt"

# name | fewshot train options (the paper's query count and schedules where the CLI has them)
rows=(
    "fomaml|--algorithm maml --first-order --train-queries 1"
    "meta-sgd|--algorithm meta-sgd --train-queries 1"
    "mamlpp|--algorithm maml++ --iterations 100000 --iterations-per-epoch 100"
    "reptile|--algorithm reptile --iterations 20000"
)
for row in "${rows[@]}"; do
    name="${row%%|*}"
    rm -rf "${runs:?}/$name"
    # shellcheck disable=SC2086  # the options are words
    python -m fewshot train ${row#*|} --dataset omniglot --device "$device" --threads 2 \
        --time-limit "$minutes" --val-every 200 --val-episodes 100 --test-episodes 0 \
        --out "$runs/$name" >"$runs/$name.log" 2>&1 &
done
wait
: >"$out/scores.jsonl"
for row in "${rows[@]}"; do
    name="${row%%|*}"
    tail -c 2000 "$runs/$name.log" | tr '\r' '\n' | tail -n 3
    python -m fewshot eval "$runs/$name" --device "$device" --episodes "$episodes" --json \
        >>"$out/scores.jsonl"
done
cat "$out/scores.jsonl"
names=()
for row in "${rows[@]}"; do names+=("${row%%|*}"); done
tar -czf "$out/runs.tar.gz" -C "$runs" "${names[@]}"

if [[ $bench != none ]]; then
    libraries=fewshot
    if [[ -d $repo/.gpu/peers ]] &&
        PYTHONPATH="$PYTHONPATH:$repo/.gpu/peers" python -c 'import learn2learn' 2>/dev/null; then
        export PYTHONPATH="$PYTHONPATH:$repo/.gpu/peers"
        libraries=fewshot,learn2learn
    else
        echo "learn2learn does not import here: the speed rows are fewshot's alone" >&2
    fi
    quick=()
    [[ $bench == quick ]] && quick=(--quick)
    python "$here/run.py" --device "$device" --workloads omniglot-maml,omniglot-mamlpp \
        --libraries "$libraries" "${quick[@]}" --json-out "$out/bench.json" --md-out "$out/bench.md"
fi
