"""The registry of datasets: what `fewshot train --dataset NAME` reads.

A dataset is one module that defines its loader and calls `register` with its entry: what kind
of data it is, the run settings that apply to it and the values it fixes, whose paper defaults
it borrows, its preprocessing record and its default network. The configuration, the training
loop, the methods, the command line and the plots ask the entry; nothing outside
`fewshot.datasets` knows a dataset by its name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot.datasets.preprocessing import Preprocessing
from fewshot.errors import ConfigError

TASKS = ("regression", "classification")
INPUTS = ("images", "vectors", "tables")
# `fewshot.models.default_model`'s networks: the sinusoid MLP, an MLP over a table's
# `features`, or the run's image `backbone`.
NETWORKS = ("sinusoid-mlp", "table-mlp", "backbone")
# The run settings of images read from files (image folders, the benchmarks), and their values.
# A network's: what builds it, the weights it starts from, and what training leaves fixed.
BACKBONE_SETTINGS = (
    "backbone", "backbone_args", "backbone_weights", "weights_prefix", "freeze", "cache_features",
)  # fmt: skip
IMAGE_SETTINGS = (*BACKBONE_SETTINGS, "normalize", "augment", "pixel_mean", "pixel_std", "sampler")
IMAGE_VALUES = {"normalize": False, "backbone": "conv4", "sampler": "fixed"}

# (run config, data root or None, download, parts) -> (inputs, labels, groups) of each part,
# groups being what Meta-Dataset's episodes draw their classes from (None: the classes).
Loader = Callable[[Any, Path | None, bool, tuple[str, ...]], list[tuple[Any, Any, Any]]]
# (run config, whether the method trains on examples) -> (training sampler, held-out sampler).
TaskGenerator = Callable[[Any, bool], tuple[Any, Any]]


@dataclass(frozen=True)
class Dataset:
    """A registered dataset, in plain values.

    `task` and `inputs` are its kind (`TASKS`, `INPUTS`); `network` its default network
    (`NETWORKS`). `settings` are the run settings (`TrainConfig` fields that belong to some
    datasets only) that apply to it; `values` what it fixes or defaults run settings to;
    `required` the settings it cannot do without, with what to give in the message.
    `defaults_from`: whose paper defaults it takes, the first a method has. Its data comes
    from `load` (labelled parts read from `default_root()` unless a folder is given or
    recorded), or from `tasks` for data it generates; `from_data` are run settings read off
    its training inputs' second dimension. Images have a preprocessing record: `source`
    describes them, `measures_background` records their background, and `before_records` is
    what runs from before such records were trained with, where known.
    """

    name: str
    task: str
    inputs: str
    network: str
    defaults_from: tuple[str, ...]
    settings: tuple[str, ...] = ()
    values: dict[str, Any] = field(default_factory=dict)
    required: dict[str, str] = field(default_factory=dict)
    load: Loader | None = None
    tasks: TaskGenerator | None = None
    default_root: Callable[[], Path] | None = None
    from_data: tuple[str, ...] = ()
    source: str | None = None
    measures_background: bool = False
    before_records: Preprocessing | None = None
    one_thread: bool = False  # its network is so small that a second thread costs time

    def __post_init__(self) -> None:
        if self.task not in TASKS or self.inputs not in INPUTS or self.network not in NETWORKS:
            raise ValueError(f"dataset {self.name!r}: unknown task, inputs or network")
        if (self.load is None) == (self.tasks is None):
            raise ValueError(f"dataset {self.name!r} needs one of load and tasks")

    @property
    def regression(self) -> bool:
        """Whether its tasks are regression (scored by MSE) rather than classification."""
        return self.task == "regression"

    @property
    def images(self) -> bool:
        """Whether its inputs are images (and so have a preprocessing record)."""
        return self.inputs == "images"


DATASETS: dict[str, Dataset] = {}
"""Every registered dataset by name: the choices of `--dataset`, filled by `register`."""


def register(dataset: Dataset) -> Dataset:
    """Add `dataset` to `DATASETS` under its name, which makes it a `--dataset` choice;
    a name already taken is refused."""
    if dataset.name in DATASETS:
        raise ValueError(f"a dataset named {dataset.name!r} is already registered")
    DATASETS[dataset.name] = dataset
    return dataset


def get_dataset(name: str) -> Dataset:
    """The registered dataset named `name`; an unknown name is refused with one line that
    lists the known ones."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return DATASETS[name]


def handled_datasets(defaults: Iterable[str]) -> str:
    """How a refusal names every dataset a method handles: those that take paper defaults
    it has (`defaults`: the datasets it has them for), "a, b or c."."""
    keys = set(defaults)
    names = [d.name for d in DATASETS.values() if keys.intersection(d.defaults_from)]
    return (", ".join(names[:-1]) + " or " if len(names) > 1 else "") + names[-1] + "."
