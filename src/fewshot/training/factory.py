"""Build the task samplers and the algorithm a configuration names; shared by train and eval."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from fewshot.algorithms import Algorithm, get_method
from fewshot.datasets.benchmarks import BENCHMARKS, load_benchmark
from fewshot.datasets.image_folder import load_image_folder
from fewshot.datasets.omniglot import (
    alphabet_groups,
    load_omniglot,
    omniglot_split,
    resolve_data_root,
)
from fewshot.datasets.preprocessing import Preprocessing, background_of, read_preprocessing
from fewshot.datasets.sinusoid import SinusoidExamples, SinusoidTasks
from fewshot.datasets.table import load_table, table_parts
from fewshot.datasets.transforms import ImageTransform, parse_augment, pixel_statistics
from fewshot.episodes import MetaDatasetSampler
from fewshot.errors import ConfigError, DataError
from fewshot.tasks import ExampleSampler, TaskSampler
from fewshot.training.config import TrainConfig


@dataclass
class TaskSources:
    """Samplers of meta-training, validation and meta-test episodes (disjoint classes); the
    training one samples mini-batches of examples instead for methods that train on them
    (`Algorithm.training_data == "examples"`)."""

    train: object
    val: object
    test: object


# The options that set each part's episodes, for messages that say which one to change.
EPISODE_OPTIONS = {"ways": "--ways", "shots": "--shots", "queries": "--queries"}
TRAINING_EPISODE_OPTIONS = {**EPISODE_OPTIONS, "ways": "--train-ways", "queries": "--train-queries"}


def build_sources(
    config: TrainConfig,
    data_root=None,
    download: bool = False,
    parts: tuple[str, ...] = ("train", "val", "test"),
) -> TaskSources:
    examples = get_method(config.algorithm).algorithm.training_data == "examples"
    if config.dataset == "sinusoid":
        if config.sampler == "meta-dataset":
            raise ConfigError("Meta-Dataset's episodes are classification episodes, not sinusoids.")
        # Sinusoid tasks are continuous: "held out" means never drawn in training, which the
        # separate random streams of training and evaluation (`stream_generator`) ensure.
        held_out = SinusoidTasks(config.shots, config.queries)
        train = (
            SinusoidExamples() if examples else SinusoidTasks(config.shots, config.train_queries)
        )
        return TaskSources(train, held_out, held_out)
    samplers = {}
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
            samplers[part] = TaskSampler(
                images,
                labels,
                ways=config.train_ways if train else config.ways,
                shots=config.shots,
                queries=config.train_queries if train else config.queries,
                option_names=TRAINING_EPISODE_OPTIONS if train else EPISODE_OPTIONS,
                transform=transform,
            )
        except (ConfigError, DataError) as error:
            raise type(error)(f"{part} part: {error}") from None
    return TaskSources(samplers.get("train"), samplers.get("val"), samplers.get("test"))


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
    """Where the configured dataset is read from: `data_root` when given; for Omniglot,
    $FEWSHOT_DATA_ROOT when set; else the folder (or CSV file) the run recorded, refused in one
    line if it has moved; else Omniglot's default folder. None for sinusoids and for a folder
    or table given nowhere."""
    if config.dataset == "sinusoid":
        return None
    if data_root is not None:
        return Path(data_root).expanduser()
    if config.dataset == "omniglot" and os.environ.get("FEWSHOT_DATA_ROOT"):
        return resolve_data_root(None)
    if config.data_root is not None:
        if not Path(config.data_root).exists():
            raise DataError(
                f"the run was trained on data in {config.data_root}, which is no longer there; "
                "point --data-root at where it is now."
            )
        return Path(config.data_root)
    return resolve_data_root(None) if config.dataset == "omniglot" else None


def labelled_parts(config: TrainConfig, data_root, download: bool, parts: tuple[str, ...]):
    """(images, labels, groups) of each requested part of the configured image dataset, groups
    being what Meta-Dataset's episodes draw their classes from (`MetaDatasetSampler`):
    Omniglot's alphabets with `--sampler meta-dataset`, else None."""
    data_root = data_root_for(config, data_root)
    if config.dataset == "folder":
        if data_root is None:
            raise DataError("--dataset folder needs --data-root DIR with train/, val/, test/.")
        loaded, channels = [], config.channels  # None: the first part's images decide
        for part in parts:
            images, labels, _ = load_image_folder(
                Path(data_root) / part, config.image_size, channels
            )
            channels = images.shape[1]
            loaded.append((images, labels, None))
        return loaded
    if config.dataset == "csv":
        if data_root is None:
            raise DataError("--dataset csv needs --data-root FILE.csv.")
        table = load_table(data_root, config.label_column)
        return [(x, y, None) for x, y in table_parts(table, parts)]
    if config.dataset in BENCHMARKS:
        return [
            (*load_benchmark(config.dataset, data_root, p, config.image_size), None) for p in parts
        ]
    characters = load_omniglot(data_root, download=download)
    split = [omniglot_split(characters, config.split, part) for part in parts]
    if config.sampler != "meta-dataset":
        return [(x, y, None) for x, y in split]
    return [(x, y, alphabet_groups(characters, y, config.split)) for x, y in split]


OMNIGLOT_SOURCE = "Omniglot's black-on-white drawings, inverted so that strokes are bright"


def training_preprocessing(config: TrainConfig, train) -> Preprocessing | None:
    """The preprocessing of an image dataset's training images (its sampler `train`), for the
    run folder; None for sinusoids and tables."""
    if config.dataset in ("sinusoid", "csv"):
        return None
    if config.dataset in BENCHMARKS:  # photos: no common background (and reading every
        # image's border would load a memory-mapped dataset whole)
        source = BENCHMARKS[config.dataset].source
        return Preprocessing(
            config.image_size, 3, None, source, config.pixel_mean, config.pixel_std
        )
    source = OMNIGLOT_SOURCE if config.dataset == "omniglot" else "an image folder, read as it is"
    background = background_of(train.inputs)
    return Preprocessing(
        config.image_size, config.channels, background, source, config.pixel_mean, config.pixel_std
    )


def recorded_preprocessing(run_dir: Path, config: TrainConfig) -> Preprocessing | None:
    """A run's preprocessing record; for runs from before such records, what its dataset
    implies (an image folder's background unknown)."""
    recorded = read_preprocessing(run_dir)
    if recorded is not None or config.dataset in ("sinusoid", "csv"):
        return recorded
    if config.dataset == "omniglot":
        return Preprocessing(28, 1, "dark", OMNIGLOT_SOURCE)
    return Preprocessing(config.image_size, config.channels, None, "an image folder")


def build_algorithm(config: TrainConfig) -> Algorithm:
    """The method a resolved configuration names, built by its registration."""
    return get_method(config.algorithm).build(config.settings, config.problem)


def has_per_way_head(config: TrainConfig) -> bool:
    """Whether the method's parameters depend on the number of ways (a head with one output
    per class), so that it cannot classify among more classes than it was built for."""
    if config.dataset == "sinusoid":
        return False
    built = build_algorithm(config).state_dict()
    wider = build_algorithm(dataclasses.replace(config, ways=config.ways + 1)).state_dict()
    return any(built[name].shape != wider[name].shape for name in built)
