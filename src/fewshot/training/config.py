"""The configuration of a training run: the run's own settings and the method's.

The run's settings (dataset, episode shape, meta-batch, outer learning rate, iterations, ...)
are fields here; the method's are its registered `Settings` dataclass (`fewshot.algorithms.
registry`). `None` means "the paper's default": each method declares its papers' values per
dataset, so nothing here knows a method by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fewshot.algorithms.registry import Method, Problem, Settings, get_method
from fewshot.backbones import is_constructor, recorded_constructor
from fewshot.datasets.registry import DATASETS, get_dataset
from fewshot.datasets.transforms import parse_augment
from fewshot.errors import ConfigError, require_positive
from fewshot.models import BACKBONES

# A classification dataset's episodes: N-way K-shot ("fixed"), or Meta-Dataset's, of varying
# ways and imbalanced shots (`fewshot.episodes`).
SAMPLERS = ("fixed", "meta-dataset")


@dataclass
class TrainConfig:
    """Everything that defines a run; `None` means "the paper's default for this method".

    `settings` holds the method's own settings, the method's `Settings` dataclass; it may be
    given as a dict of the ones given, which `__post_init__` makes that dataclass.
    `meta_batch` counts tasks, or examples for methods trained on ordinary batches
    (`Algorithm.training_data == "examples"`).
    """

    algorithm: str = "maml"
    dataset: str = "sinusoid"
    split: str | None = None  # Omniglot's: vinyals or lake
    backbone: str | None = None  # images' network (models.BACKBONES, or module:callable)
    backbone_args: dict[str, Any] | None = None  # a constructor backbone's keyword arguments
    backbone_weights: str | None = None  # a file of weights the new run's backbone starts from
    weights_prefix: str | None = None  # a prefix of the weights file's keys to strip ("+": add)
    freeze: str | None = None  # what meta-training leaves fixed (`backbones.FREEZE_KEYWORDS`)
    cache_features: bool | None = None  # a backbone frozen whole: features computed once
    image_size: int | None = None  # an image folder's: 28 unless given (Omniglot: 28)
    channels: int | None = None  # an image folder's: from its images unless given (Omniglot: 1)
    normalize: bool | None = None  # an image folder's: standardise each channel
    augment: str | None = None  # an image folder's: "flip", "crop" or "flip,crop" in training
    pixel_mean: list[float] | None = None  # with normalize: the training images', recorded
    pixel_std: list[float] | None = None
    label_column: str | None = None  # --dataset csv: the column of each row's class
    class_split: str | None = None  # --dataset csv: "TRAIN,VAL,TEST" shares of the classes
    features: int | None = None  # --dataset csv: the row's feature count, from the data
    sampler: str | None = None  # a classification dataset's: one of SAMPLERS
    ways: int = 5
    shots: int | None = None
    queries: int | None = None
    train_ways: int | None = None
    train_queries: int | None = None
    meta_batch: int | None = None
    outer_lr: float | None = None
    iterations: int | None = None
    val_every: int | None = None
    val_episodes: int = 200
    checkpoint_every: int = 100
    time_limit: float | None = None
    seed: int = 0
    test_episodes: int = 600  # meta-test episodes at the end of training (0: none)
    data_root: str | None = None  # where the data was when the run started (recorded)
    init: str | None = None  # a run whose best weights this run starts from
    # A dict given here becomes the method's `Settings` in `__post_init__`.
    settings: Settings = field(default_factory=dict)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if isinstance(self.settings, dict):
            method = get_method(self.algorithm)
            self.settings = _settings_from_dict(method.name, method.settings, self.settings)

    @property
    def problem(self) -> Problem:
        """What the method is built for: dataset, ways and the shape of its inputs."""
        return Problem(
            self.dataset,
            self.ways,
            self.channels,
            self.image_size,
            self.features,
            self.backbone or "conv4",
            self.backbone_args,
            self.freeze,
        )

    def resolved(self, device: str = "cpu") -> TrainConfig:
        """A copy with every `None` replaced by its default for training on `device`, checked
        for consistency."""
        method = get_method(self.algorithm)
        check_registration(method)
        dataset = get_dataset(self.dataset)
        defaults = method.defaults_for(dataset)
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "settings"}
        check_dataset_settings(values)
        for name, value in dataset.values.items():
            if values[name] is None:
                values[name] = value
        for name in values:
            if values[name] is None and name in defaults:
                values[name] = defaults[name]
        values["train_ways"] = values["train_ways"] or values["ways"]
        if is_constructor(values["backbone"]):  # a file's path, absolute: from any folder
            values["backbone"] = recorded_constructor(values["backbone"])
        if values["backbone_weights"] is not None:
            values["backbone_weights"] = str(
                Path(values["backbone_weights"]).expanduser().resolve()
            )
        values["train_queries"] = values["train_queries"] or values["queries"]
        settings = dataclasses.asdict(self.settings)
        for f in fields(self.settings):
            if settings[f.name] is None:
                settings[f.name] = defaults.get(f.name, f.metadata["fallback"])
        if settings["batch_norm"] is None:
            settings["batch_norm"] = method.batch_norm
        run = TrainConfig(**values, settings=method.settings(**settings))
        run.check()
        run.settings = run.settings.resolve(run, device)
        run.settings.check(run)
        return run

    def check(self) -> None:
        """Refuse, with one line, run settings that cannot work together (non-positive
        sizes, one-class episodes, unknown samplers or backbones, images under 16 pixels)."""
        # `resolved` gives these their values (the dataset's, or the method's papers').
        assert self.shots is not None and self.queries is not None
        assert self.train_ways is not None and self.train_queries is not None
        assert self.meta_batch is not None and self.iterations is not None
        assert self.val_every is not None and self.outer_lr is not None
        require_positive(
            ways=self.ways,
            shots=self.shots,
            queries=self.queries,
            train_ways=self.train_ways,
            train_queries=self.train_queries,
            meta_batch=self.meta_batch,
            iterations=self.iterations,
            val_every=self.val_every,
            val_episodes=self.val_episodes,
            checkpoint_every=self.checkpoint_every,
            image_size=self.image_size or 28,
            channels=self.channels or 1,
            outer_lr=self.outer_lr,
            time_limit=self.time_limit if self.time_limit is not None else 1,
        )
        dataset = get_dataset(self.dataset)
        if not dataset.regression:  # classification: a one-class episode is always right
            for name in ("ways", "train_ways"):
                if getattr(self, name) < 2:
                    raise ConfigError(
                        f"{name} must be at least 2 (every answer in a one-class episode is "
                        f"right), got {getattr(self, name)}."
                    )
        for name, wanted in dataset.required.items():
            if getattr(self, name) is None:
                raise ConfigError(f"`dataset={self.dataset}` needs `{name}` {wanted}.")
        parse_augment(self.augment)
        if self.sampler not in (None, *SAMPLERS):
            raise ConfigError(
                f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}."
            )
        if self.backbone not in (None, *BACKBONES) and not is_constructor(self.backbone):
            raise ConfigError(
                f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}, or "
                "name a constructor as package.module:callable."
            )
        if self.backbone_args is not None and not is_constructor(self.backbone):
            raise ConfigError("`backbone_args` are a constructor's; name one with `backbone`.")
        if self.weights_prefix is not None and self.backbone_weights is None:
            raise ConfigError("`weights_prefix` applies to `backbone_weights`; give the file.")
        check_pixel_statistics(self.pixel_mean, self.pixel_std, self.channels)
        if self.cache_features and self.freeze != "backbone":
            raise ConfigError(
                "`cache_features` applies to a backbone frozen whole; give `freeze=backbone`."
            )
        if self.backbone_weights is not None and self.init is not None:
            raise ConfigError(
                "a run starts from `init` or from `backbone_weights`, not both; drop one."
            )
        if self.test_episodes < 0:
            raise ConfigError(f"`test_episodes` must be >= 0, got {self.test_episodes}.")
        if self.channels not in (1, 3, None):  # None: an image folder's, until it is read
            raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}.")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(
                f"image_size must be at least 16 (Conv4 halves it four times), got "
                f"{self.image_size}."
            )

    def to_dict(self) -> dict:
        """One flat dict: the run's settings, then the method's (as config files hold them);
        settings of other datasets are left out."""
        run = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "settings" and applies(f.name, self.dataset)
        }
        return {**run, **dataclasses.asdict(self.settings)}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """From a flat dict of run and method settings (a config file's, a run's config.json);
        unknown keys, and values of the wrong type, are refused with one line."""
        if not isinstance(values, dict):
            raise ConfigError("settings must be one JSON object of names and values.")
        run_keys = {f.name for f in fields(cls)} - {"settings"}
        run = checked_types({k: v for k, v in values.items() if k in run_keys}, cls)
        settings = {k: v for k, v in values.items() if k not in run_keys}
        return cls(**run, settings=settings)  # type: ignore[arg-type]  # see `settings`


def checked_types(values: dict, owner: type) -> dict:
    """`values` with each checked against the type of `owner`'s field of that name (numbers
    where numbers go, and so on; ints are accepted as floats); a ConfigError names the first
    value that does not fit, all of them."""
    hints = typing.get_type_hints(owner)
    checked, errors = {}, []
    for name, value in values.items():
        try:
            checked[name] = _checked(name, value, hints[name])
        except ConfigError as error:
            errors.append(str(error))
    if errors:  # every value that does not fit, not only the first
        raise ConfigError(" ".join(errors))
    return checked


def _checked(name: str, value: Any, hint: Any) -> Any:
    options = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    if value is None and type(None) in options:
        return None
    for kind in options:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        if typing.get_origin(kind) is list and isinstance(value, list):
            return [_checked(name, item, typing.get_args(kind)[0]) for item in value]
        if typing.get_origin(kind) is dict and isinstance(value, dict):
            return value
        if kind is Any:
            return value
    wanted = " or ".join(TYPE_NAMES.get(k, str(k)) for k in options)
    raise ConfigError(f"{name} must be {wanted}, got {value!r}.")


TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a text",
    type(None): "null",
    list[float]: "a list of numbers",
    dict[str, Any]: "an object of names and values",
}


def check_pixel_statistics(
    mean: list[float] | None, std: list[float] | None, channels: int | None
) -> None:
    """The per-channel mean and standard deviation images are standardised with: both or
    neither, one value per channel (where the channels are known), deviations positive."""
    if (mean is None) != (std is None):
        raise ConfigError("`pixel_mean` and `pixel_std` go together; give both.")
    if mean is None or std is None:
        return
    if len(mean) != len(std) or (channels is not None and len(mean) != channels):
        wanted = f"{channels} (the images' channels)" if channels else "as many as each other"
        raise ConfigError(
            f"`pixel_mean` has {len(mean)} values and `pixel_std` {len(std)}; give {wanted}."
        )
    if not all(s > 0 for s in std):
        raise ConfigError(f"`pixel_std` must be positive, got {std}.")


def dataset_settings() -> list[str]:
    """The run settings that belong to some datasets only (those the registered datasets list
    in their `settings`): given for another, they are refused; a run's config.json holds them
    only where they apply."""
    return [
        name
        for name in run_setting_names()
        if any(name in dataset.settings for dataset in DATASETS.values())
    ]


def applies(name: str, dataset: str) -> bool:
    """Whether the run setting `name` belongs to `dataset`."""
    own = DATASETS[dataset].settings if dataset in DATASETS else ()
    return name in own or name not in dataset_settings()


def check_episode_settings(given: dict) -> None:
    """Meta-Dataset's episodes draw their own shots and queries: giving them (`given`: the
    settings a user gave) is refused rather than ignored."""
    if given.get("sampler") != "meta-dataset":
        return
    names = ("shots", "queries", "train_ways", "train_queries")
    drawn = [name for name in names if given.get(name) is not None]
    if drawn:
        listed = ", ".join(f"`{name}`" for name in drawn)
        raise ConfigError(
            f"`sampler=meta-dataset` draws each episode's ways, shots and queries; drop {listed}."
        )


def check_dataset_settings(values: dict) -> None:
    """Refuse a run setting given for a dataset it does not belong to (e.g. `split` with
    sinusoids): it would do nothing."""
    dataset = values["dataset"]
    for name in dataset_settings():
        if values[name] is not None and not applies(name, dataset):
            datasets = [other.name for other in DATASETS.values() if name in other.settings]
            raise ConfigError(
                f"`{name}` applies to `dataset` {' or '.join(datasets)} only, not {dataset}."
            )


def without_other_datasets_settings(document: dict) -> dict:
    """A run folder's config without the settings that do not belong to its dataset (older
    runs wrote every one)."""
    dataset = document.get("dataset", "sinusoid")
    return {k: v for k, v in document.items() if applies(k, dataset)}


def check_registration(method: Method) -> None:
    """A method's declaration must name only real settings (a developer error otherwise)."""
    run, own = set(run_setting_names()), {f.name for f in fields(method.settings)}
    if run & own:
        raise ValueError(f"{method.name}'s settings reuse run setting names: {sorted(run & own)}")
    for dataset, values in method.defaults.items():
        unknown = set(values) - run - own
        if unknown:
            raise ValueError(
                f"{method.name}'s {dataset} defaults name no setting: {sorted(unknown)}"
            )


def run_setting_names() -> list[str]:
    return [f.name for f in fields(TrainConfig) if f.name != "settings"]


def closest_names(unknown: list[str], names: list[str]) -> str:
    """ " (did you mean iterations?)" for the names in `names` closest to the unknown ones,
    or "" where none is close."""
    matches = [m for u in unknown for m in difflib.get_close_matches(u, names, n=1)]
    return f" (did you mean {', '.join(dict.fromkeys(matches))}?)" if matches else ""


def _settings_from_dict(name: str, settings_class: type[Settings], values: dict) -> Settings:
    known = {f.name for f in fields(settings_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        given = ", ".join(unknown)
        raise ConfigError(
            f"{given} {'is not a setting' if len(unknown) == 1 else 'are not settings'} of "
            f"{name}{closest_names(unknown, [*known, *run_setting_names()])}; its settings are "
            f"{', '.join(sorted(known))}, and the run's are {', '.join(run_setting_names())}."
        )
    return settings_class(**checked_types(values, settings_class))
