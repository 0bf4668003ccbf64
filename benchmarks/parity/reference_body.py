"""A run folder holding a pair's fewshot model with its pretrained body replaced by the
reference's (Baseline and Baseline++ pairs against Chen et al.'s CloserLookFewShot): the
reference's own pretraining, fine-tuned at test by fewshot. Scored with `run.py ...
--score-control FOLDER`, it tells a gap in the pretraining from one in the fine-tuning
(docs/parity.md, Baseline++'s accuracy).

    python benchmarks/parity/reference_body.py runs/parity-baseline++ \
        runs/control-baseline++-reference-body

Their `backbone.Conv4S` block i (`feature.trunk.i.C`, the convolution, and `.BN`) is fewshot's
`encoder.features.i.0` and `.1`, the same shapes; Baseline++'s pretraining head
(`classifier.L.weight_v`, `weight_g`) is fewshot's `classifier.direction` and `norm`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REFERENCE_WEIGHTS = "best.pt"  # run.py's name for the reference's best-validated weights
FEWSHOT_FILES = ("config.json", "preprocessing.json")
LAYERS = {"C": "0", "BN": "1"}  # their block's layer -> fewshot's index in a Conv4 stage
HEAD = {"model.classifier.L.weight_v": "classifier.direction",
        "model.classifier.L.weight_g": "classifier.norm"}  # fmt: skip


def fewshot_name(theirs: str) -> str | None:
    """fewshot's name of one of their tensors, or None for those fewshot has no place for."""
    if theirs in HEAD:
        return HEAD[theirs]
    parts = theirs.split(".")  # model.feature.trunk.I.C.weight
    if parts[1:3] == ["feature", "trunk"] and len(parts) == 6 and parts[4] in LAYERS:
        return f"encoder.features.{parts[3]}.{LAYERS[parts[4]]}.{parts[5]}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pair", type=Path, help="a pair's folder (fewshot/ and reference/)")
    parser.add_argument("out", type=Path, help="the new run folder")
    args = parser.parse_args()
    reference = torch.load(args.pair / "reference" / REFERENCE_WEIGHTS, weights_only=True)
    weights = load_file(args.pair / "fewshot" / "model.safetensors")
    replaced = 0
    for theirs, tensor in reference.items():
        name = fewshot_name(theirs)
        if name is None:
            continue
        if name not in weights:
            raise SystemExit(f"{theirs} maps to {name}, which the fewshot model does not have")
        weights[name] = tensor.reshape(weights[name].shape).clone()
        replaced += 1
    args.out.mkdir(parents=True, exist_ok=False)
    for name in FEWSHOT_FILES:
        shutil.copy(args.pair / "fewshot" / name, args.out / name)
    save_file({k: v.contiguous() for k, v in weights.items()}, args.out / "model.safetensors")
    print(f"{args.out}: {replaced} of the reference's tensors in fewshot's model")


if __name__ == "__main__":
    main()
