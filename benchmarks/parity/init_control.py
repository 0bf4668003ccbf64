"""A run folder holding fewshot's initial model for a method, changed in one controlled way,
for `fewshot train --init FOLDER`: the parity pairs' initialisation controls (docs/parity.md).

- `chen`: re-initialised as Chen et al.'s CloserLookFewShot initialises theirs
  (`backbone.init_layer`: convolution weights normal with variance 2 / (k * k * out_channels),
  batch norm's scale 1 and shift 0). Tests whether a gap is the initialisation.
- `ulp`: every parameter moved by one float32 unit in the last place, up or down at random.
  The same method from weights that differ by rounding alone: how far two runs that differ
  only by rounding end apart, the yardstick for a pair whose computations agree (MAML's first
  meta-gradient to 1e-10) but whose trained models do not.

Several controls apply in the order given (`chen,ulp`: Chen et al.'s initialisation, then
one ulp away from it).

    PYTHONPATH=src python benchmarks/parity/init_control.py chen baseline runs/init-chen-baseline \
        --data-root ../shared/data/omniglot
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from fewshot.training import checkpoint
from fewshot.training.config import TrainConfig
from fewshot.training.factory import build_algorithm, build_sources
from fewshot.training.loop import seed_everything


def chen_init_(module: nn.Module) -> None:
    """Chen et al.'s initialisation of every convolution and batch-norm layer, in place."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                fan = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels
                layer.weight.normal_(0, math.sqrt(2.0 / fan))
            elif isinstance(layer, nn.BatchNorm2d):
                layer.weight.fill_(1)
                layer.bias.fill_(0)


def one_ulp_(module: nn.Module, seed: int = 0) -> None:
    """Move every parameter of `module` to its next representable value, towards +inf or -inf
    (a fair coin per coordinate, from `seed`), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            up = torch.rand(parameter.shape, generator=generator) < 0.5
            target = torch.where(up, math.inf, -math.inf).to(parameter.dtype)
            parameter.copy_(torch.nextafter(parameter, target))


CONTROLS = {"chen": chen_init_, "ulp": one_ulp_}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("controls", help=f"comma-separated, of {', '.join(sorted(CONTROLS))}")
    parser.add_argument("algorithm")
    parser.add_argument("out", type=Path)
    parser.add_argument("--backbone", default=None, help="as the pair's `fewshot train`")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    controls = args.controls.split(",")
    unknown = [name for name in controls if name not in CONTROLS]
    if unknown:
        parser.error(f"unknown control {unknown[0]!r}; choose from {', '.join(sorted(CONTROLS))}")
    options = {"backbone": args.backbone} if args.backbone else {}
    config = TrainConfig(algorithm=args.algorithm, dataset="omniglot", **options).resolved()
    sources = build_sources(config, args.data_root, parts=("train",))
    config.settings = config.settings.fit_data(sources.train)  # the pretraining head's size
    seed_everything(config.seed)
    algorithm = build_algorithm(config)
    for name in controls:
        CONTROLS[name](algorithm)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_config(args.out, config)
    checkpoint.save_weights(algorithm, args.out / checkpoint.BEST_WEIGHTS)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
