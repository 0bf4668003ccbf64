#!/usr/bin/env bash
# Checks out the parity references' code at fixed commits, outside this repository:
#   ${FEWSHOT_REFERENCES:-$HOME/.cache/fewshot-references}/<name>
# From a local mirror where there is one (FEWSHOT_MIRRORS, default /work/.mirror, holding
# <owner>+<name>/repo), else from GitHub. Running it again checks the commits out again.
set -euo pipefail

ROOT="${FEWSHOT_REFERENCES:-$HOME/.cache/fewshot-references}"
MIRRORS="${FEWSHOT_MIRRORS:-/work/.mirror}"

# clone_once OWNER NAME: a clone without a work tree in $ROOT/NAME, unless one is there
clone_once() {
    local owner=$1 name=$2
    local dest="$ROOT/$name" mirror="$MIRRORS/$owner+$name/repo"
    if [ ! -d "$dest/.git" ]; then
        mkdir -p "$ROOT"
        if [ -d "$mirror" ]; then
            git clone --quiet --no-checkout "$mirror" "$dest"
        else
            git clone --quiet --no-checkout "https://github.com/$owner/$name" "$dest"
        fi
    fi
}

# checkout OWNER NAME COMMIT
checkout() {
    local owner=$1 name=$2 commit=$3
    local dest="$ROOT/$name"
    clone_once "$owner" "$name"
    if ! git -C "$dest" cat-file -e "$commit^{commit}" 2>/dev/null; then
        git -C "$dest" fetch --quiet origin
    fi
    git -C "$dest" -c advice.detachedHead=false checkout --quiet --force --detach "$commit"
    echo "$owner/$name at $(git -C "$dest" rev-parse HEAD) in $dest"
}

# Chen et al. 2019, A Closer Look at Few-shot Classification (references/closerlook.py)
checkout wyharveychen CloserLookFewShot e03aca8a2d01c9b5861a5a816cd5d3fdfc47cd45

# without_datasets OWNER NAME: clone as `checkout` does, checking out everything but datasets/
# (run before `checkout`, which then finds the clone)
without_datasets() {
    local owner=$1 name=$2
    local dest="$ROOT/$name"
    clone_once "$owner" "$name"
    git -C "$dest" config core.sparseCheckout true
    printf '/*\n!/datasets/\n' >"$dest/.git/info/sparse-checkout"
}

# Antoniou et al. 2019, How to train your MAML (references/howtotrain.py). Without datasets/:
# their Omniglot images and indexes, which the harness never reads (it feeds fewshot's
# episodes), and whose mini_imagenet_full_size.json blob a local mirror may lack.
without_datasets AntreasAntoniou HowToTrainYourMAMLPytorch
checkout AntreasAntoniou HowToTrainYourMAMLPytorch 86964701651c06e490271365fedb8789a72ef3f0

# Ravi & Larochelle 2017's Meta-LSTM as markdtw's PyTorch port (references/metalstm_markdtw.py)
checkout markdtw meta-learning-lstm-pytorch fcc68baad71a3293edeb227a1676de9e9edea9c3
