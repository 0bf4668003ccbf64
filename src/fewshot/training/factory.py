"""Build the task samplers and the algorithm a configuration names; shared by train and eval."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from fewshot.algorithms import Algorithm, get_method
from fewshot.datasets.preprocessing import Preprocessing, background_of, read_preprocessing
from fewshot.datasets.registry import get_dataset
from fewshot.datasets.sinusoid import SinusoidExamples, SinusoidTasks
from fewshot.datasets.transforms import ImageTransform, parse_augment, pixel_statistics
from fewshot.episodes import MetaDatasetSampler
from fewshot.errors import ConfigError, DataError
from fewshot.tasks import ExampleSampler, TaskSampler
from fewshot.training.config import TrainConfig

# A sampler of episodes: N-way K-shot, Meta-Dataset's, or a generated dataset's tasks.
EpisodeSampler = TaskSampler | MetaDatasetSampler | SinusoidTasks
# The training part's: episodes, or mini-batches of examples for the methods that train on them.
TrainingSampler = EpisodeSampler | ExampleSampler | SinusoidExamples


@dataclass
class TaskSources:
    """Samplers of meta-training, validation and meta-test episodes (disjoint classes); the
    training one samples mini-batches of examples instead for methods that train on them
    (`Algorithm.training_data == "examples"`). A part not built (`build_sources`'s `parts`)
    is None."""

    train: TrainingSampler | None
    val: EpisodeSampler | None
    test: EpisodeSampler | None


# What a training sampler's errors call its ways and queries, so that they say which option to
# change (the other parts' samplers name them as they are).
TRAINING_EPISODE_OPTIONS = {"ways": "train_ways", "queries": "train_queries"}


def build_sources(
    config: TrainConfig,
    data_root=None,
    download: bool = False,
    parts: tuple[str, ...] = ("train", "val", "test"),
) -> TaskSources:
    examples = get_method(config.algorithm).algorithm.training_data == "examples"
    dataset = get_dataset(config.dataset)
    if dataset.tasks is not None:  # generated: the held-out tasks are never drawn in training
        train, held_out = dataset.tasks(config, examples)
        return TaskSources(train, held_out, held_out)
    samplers: dict[str, TrainingSampler] = {}
    loaded = labelled_parts(config, data_root, download, parts)
    if config.normalize and config.pixel_mean is None:  # where it applies: folders, benchmarks
        config.pixel_mean, config.pixel_std = pixel_statistics(loaded[0][0])  # training images
    for part, (images, labels, groups) in zip(parts, loaded):
        train = part == "train"
        transform = image_transform(config, train)
        if train and examples:
            samplers[part] = ExampleSampler(images, labels, transform)
            continue
        try:
            if config.sampler == "meta-dataset":
                samplers[part] = MetaDatasetSampler(images, labels, groups, transform=transform)
                continue
            # The resolved configuration's (its dataset's, or the method's papers' values).
            assert config.shots is not None and config.queries is not None
            assert config.train_ways is not None and config.train_queries is not None
            samplers[part] = TaskSampler(
                images,
                labels,
                ways=config.train_ways if train else config.ways,
                shots=config.shots,
                queries=config.train_queries if train else config.queries,
                option_names=TRAINING_EPISODE_OPTIONS if train else None,
                transform=transform,
            )
        except (ConfigError, DataError) as error:
            raise type(error)(f"{part} part: {error}") from None
    held_out = cast(dict[str, EpisodeSampler], samplers)  # only "train" may sample examples
    return TaskSources(samplers.get("train"), held_out.get("val"), held_out.get("test"))


def image_transform(config: TrainConfig, train: bool) -> ImageTransform | None:
    """The images' standardisation (`--normalize`), and for training episodes their
    augmentation (`--augment`); None where there is neither."""
    augment = parse_augment(config.augment) if train else ()
    if config.pixel_mean is None and not augment:
        return None
    mean = None if config.pixel_mean is None else tuple(config.pixel_mean)
    std = None if config.pixel_std is None else tuple(config.pixel_std)
    return ImageTransform(mean, std, augment)


def data_root_for(config: TrainConfig, data_root=None) -> Path | None:
    """Where the configured dataset is read from: `data_root` when given; for a dataset with a
    default folder (Omniglot), $FEWSHOT_DATA_ROOT when set; else the folder (or CSV file) the
    run recorded, refused in one line if it has moved; else the default folder. None for
    generated data (sinusoids) and for a folder or table given nowhere."""
    dataset = get_dataset(config.dataset)
    if dataset.load is None:
        return None
    if data_root is not None:
        return Path(data_root).expanduser()
    if dataset.default_root is not None and os.environ.get("FEWSHOT_DATA_ROOT"):
        return dataset.default_root()
    if config.data_root is not None:
        if not Path(config.data_root).exists():
            raise DataError(
                f"the run was trained on data in {config.data_root}, which is no longer there; "
                "point `data_root` at where it is now."
            )
        return Path(config.data_root)
    return None if dataset.default_root is None else dataset.default_root()


def labelled_parts(config: TrainConfig, data_root, download: bool, parts: tuple[str, ...]):
    """(images, labels, groups) of each requested part of the configured dataset, groups being
    what Meta-Dataset's episodes draw their classes from (`MetaDatasetSampler`), or None."""
    data_root = data_root_for(config, data_root)
    dataset = get_dataset(config.dataset)
    if dataset.images and data_root is not None and data_root.is_file():
        raise DataError(
            f"`data_root` is the folder that holds {dataset.name}'s files, and {data_root} is a "
            f"file; point it at the folder, {data_root.parent}."
        )
    load = dataset.load
    assert load is not None  # a dataset read from files, not generated (`Dataset.tasks`)
    return load(config, data_root, download, parts)


def training_preprocessing(config: TrainConfig, train) -> Preprocessing | None:
    """The preprocessing of an image dataset's training images (its sampler `train`), for the
    run folder; None for data without a record (sinusoids, tables)."""
    dataset = get_dataset(config.dataset)
    if dataset.source is None:
        return None
    background = background_of(train.inputs) if dataset.measures_background else None
    assert config.image_size is not None and config.channels is not None  # images': resolved
    return Preprocessing(
        config.image_size,
        config.channels,
        background,
        dataset.source,
        config.pixel_mean,
        config.pixel_std,
    )


def recorded_preprocessing(run_dir: Path, config: TrainConfig) -> Preprocessing | None:
    """A run's preprocessing record; for runs from before such records, what its dataset
    implies (where it does not say: an image folder's, its background unknown)."""
    recorded = read_preprocessing(run_dir)
    dataset = get_dataset(config.dataset)
    if recorded is not None or dataset.source is None:
        return recorded
    if dataset.before_records is not None:
        return dataset.before_records
    assert config.image_size is not None and config.channels is not None  # images': recorded
    return Preprocessing(config.image_size, config.channels, None, "an image folder")


def build_algorithm(config: TrainConfig) -> Algorithm:
    """The method a resolved configuration names, built by its registration."""
    return get_method(config.algorithm).build(config.settings, config.problem)


def has_per_way_head(config: TrainConfig, built: Algorithm | None = None) -> bool:
    """Whether the method's parameters depend on the number of ways (a head with one output
    per class), so that it cannot classify among more classes than it was built for.

    Asked of the method's shapes (`built`, the method as `config` builds it, against one built
    a way wider), so that no method has to declare it and none can declare it wrongly."""
    if get_dataset(config.dataset).regression:
        return False
    shapes = (built or build_algorithm(config)).state_dict()
    wider = build_algorithm(dataclasses.replace(config, ways=config.ways + 1)).state_dict()
    return any(shapes[name].shape != wider[name].shape for name in shapes)
