"""The field's image benchmarks by their `--dataset` names: each one's reader, its images'
default side, and the folder `--data-root` names (docs/datasets.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from fewshot.datasets.cifar import load_cifar_fs, load_fc100
from fewshot.datasets.cub import load_cub
from fewshot.datasets.imagenet import load_mini_imagenet, load_tiered_imagenet
from fewshot.datasets.registry import IMAGE_SETTINGS, IMAGE_VALUES, Dataset, register
from fewshot.errors import ConfigError, DataError

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's reader `load(root, part, image_size)`, its images' usual side, and what
    its data folder holds."""

    load: Callable[[Path, str, int], tuple[torch.Tensor, torch.Tensor]]
    image_size: int
    holds: str
    source: str


BENCHMARKS = {
    "mini-imagenet": Benchmark(
        load_mini_imagenet,
        84,
        "train.csv, val.csv, test.csv and images/",
        "miniImageNet's photos (Ravi & Larochelle's split), RGB",
    ),
    "tiered-imagenet": Benchmark(
        load_tiered_imagenet,
        84,
        "train/, val/ and test/ of class folders",
        "tieredImageNet's photos, RGB",
    ),
    "cifar-fs": Benchmark(
        load_cifar_fs,
        32,
        "cifar-100-binary/ (train.bin, test.bin)",
        "CIFAR-100's photos (CIFAR-FS split), RGB",
    ),
    "fc100": Benchmark(
        load_fc100,
        32,
        "cifar-100-binary/ (train.bin, test.bin)",
        "CIFAR-100's photos (FC100 split), RGB",
    ),
    "cub": Benchmark(
        load_cub,
        84,
        "CUB_200_2011/images/",
        "CUB-200-2011's bird photos (Chen et al.'s split), RGB",
    ),
}
"""The field's image benchmarks by `--dataset` name: each one's reader, image size and the
folder it expects."""


def load_benchmark(
    name: str, data_root: str | Path | None, part: str, image_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, size, size) uint8 and class labels of one part of a benchmark."""
    benchmark = BENCHMARKS[name]
    if part not in PARTS:
        raise ConfigError(f"unknown split part {part!r}; choose one of {', '.join(PARTS)}.")
    if data_root is None:
        raise DataError(
            f"`dataset={name}` needs `data_root` DIR, the folder that holds {benchmark.holds}."
        )
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"`data_root={root}` is not a folder; point it at {benchmark.holds}.")
    return benchmark.load(root, part, image_size or benchmark.image_size)


def load_parts(name: str, config, data_root: Path | None, download: bool, parts: tuple[str, ...]):
    """(images, labels, None) of each part of the benchmark `name`."""
    return [(*load_benchmark(name, data_root, p, config.image_size), None) for p in parts]


for _name, _benchmark in BENCHMARKS.items():
    register(
        Dataset(
            _name,
            task="classification",
            inputs="images",
            network="backbone",
            # the method's own, else its miniImageNet ones (the papers' usual setting for
            # natural images), else its image ones, as image folders take
            defaults_from=tuple(dict.fromkeys((_name, "mini-imagenet", "omniglot"))),
            settings=IMAGE_SETTINGS,  # not image_size: theirs is their published size
            values={**IMAGE_VALUES, "image_size": _benchmark.image_size, "channels": 3},
            load=partial(load_parts, _name),
            # photos: no common background (and reading every image's border would load a
            # memory-mapped dataset whole)
            source=_benchmark.source,
        )
    )
