"""The registry of methods: what `fewshot train --algorithm NAME` and `fewshot methods` read.

A method is one module that defines its algorithm class, a `Settings` dataclass (its options,
with help text), its papers' defaults per dataset and a `build` function, and calls `register`.
The training loop, the command line and the configuration know nothing else about it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import BATCH_NORM_POLICIES, Algorithm, check_batch_norm_policy
from fewshot.algorithms.gradient import CPU_IMAGES_PER_PASS, default_chunk_size
from fewshot.backbones import build_backbone_network, freeze, is_constructor, mark_backbone
from fewshot.datasets.registry import Dataset, get_dataset, handled_datasets
from fewshot.errors import ConfigError, require_positive
from fewshot.models import default_model


def setting(
    help: str,
    fallback: Any = None,
    choices: tuple[str, ...] | None = None,
    default_text: str | None = None,
    recorded_before: Any = None,
    learning_rate: bool = False,
):
    """A field of a method's settings. Its value comes from, in order: the user; the paper's
    value for the dataset (the method's `defaults`); `fallback`; a rule of `Settings.resolve`.
    `default_text` describes the default in help text where a rule makes it.
    `recorded_before`: for a setting added after runs were recorded without it, the value those
    runs were trained with, which a run folder that lacks the setting keeps (None: the default).
    `learning_rate`: a step size that a divergence may be blamed on and a tuner searches on a
    log scale (not the final or minimum value of a schedule).
    """
    metadata = {"help": help, "fallback": fallback, "choices": choices}
    metadata |= {"default_text": default_text, "recorded_before": recorded_before}
    metadata |= {"learning_rate": learning_rate}
    return field(default=None, metadata=metadata)


def default_text(f) -> str:
    """How the command line describes a setting's default."""
    if f.metadata["default_text"]:
        return f"[default: {f.metadata['default_text']}]"
    fallback = f.metadata["fallback"]
    if fallback is None:
        return "[default: the paper's, per dataset]"
    return f"[default: the paper's, per dataset, else {fallback}]"


@dataclass(frozen=True)
class Problem:
    """What a method is built for: the dataset (its `--dataset` name) and the episode shape of
    its data."""

    dataset: str
    ways: int
    channels: int | None = 1  # of images (None for other data)
    image_size: int | None = 28  # of images
    features: int | None = None  # of a table's rows
    backbone: str = "conv4"  # images' network: `models.BACKBONES`, or a constructor
    backbone_args: dict[str, Any] | None = field(default=None, hash=False)  # a constructor's
    freeze: str | None = None  # the part of the backbone left fixed (`backbones.freeze`)

    @property
    def regression(self) -> bool:
        return get_dataset(self.dataset).regression

    def network(self, head: bool = True, track_running_stats: bool = False) -> nn.Module:
        """The network for this problem: the literature's (`models.default_model`, images: the
        `backbone`), or the one a constructor builds (`backbones.build_backbone_network`),
        with a `ways`-way head or without one (an embedding network), its `freeze` part
        fixed."""
        ways = self.ways if head else None
        network: nn.Module
        if is_constructor(self.backbone):
            assert self.channels is not None and self.image_size is not None  # images'
            shape = (self.channels, self.image_size, self.image_size)
            network = build_backbone_network(self.backbone, self.backbone_args, ways, shape)
        else:
            network = default_model(
                self.dataset,
                ways,
                self.channels,
                self.image_size,
                # a frozen part keeps statistics, its own or its weights file's
                track_running_stats or bool(self.freeze),
                self.features,
                self.backbone,
            )
        if self.freeze:
            freeze(network, self.freeze)
        mark_backbone(network)
        return network

    @property
    def loss(self) -> Callable:
        """Mean squared error for regression, cross-entropy for classification."""
        return F.mse_loss if self.regression else F.cross_entropy


@dataclass
class Settings:
    """A method's own settings (the episode shape, meta-batch and outer learning rate are the
    run's, in `TrainConfig`)."""

    batch_norm: str | None = setting(
        "Batch-norm statistics at prediction: transductive (the batch of queries) or inductive "
        "(no query sees another).",
        choices=BATCH_NORM_POLICIES,
        default_text="the method's paper's",
    )

    def resolve(self, run, device: str) -> Settings:
        """A copy with the values that derive from the run (`TrainConfig`) filled in."""
        return dataclasses.replace(self)

    def check(self, run) -> None:
        """Raise ConfigError for values that are invalid or do not fit the run."""
        check_batch_norm_policy(self.batch_norm)

    def fit_data(self, train) -> Settings:
        """A copy with the values that derive from the training data (its sampler `train`)
        filled in, such as the size of a pretraining head; once, when a run starts."""
        return self

    def learning_rates(self) -> dict[str, float]:
        """The method's own learning rates by setting name (those declared `learning_rate`),
        for the divergence message and the tuner's default search."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["learning_rate"]}


@dataclass
class InnerLoopSettings(Settings):
    """Settings of every method with a gradient-based inner loop."""

    inner_lr: float | None = setting(
        "Inner (adaptation) step size alpha; Meta-SGD: the initial value of every learned "
        "step size; Reptile: the inner optimizer's learning rate.",
        learning_rate=True,
    )
    inner_steps: int | None = setting("Inner steps per task in meta-training.", fallback=1)
    eval_inner_steps: int | None = setting(
        "Inner steps when adapting a trained model (evaluation, prediction).",
        default_text="the paper's, per dataset, else `inner_steps`",
    )
    vectorize: bool | None = setting(
        "Run the tasks of a meta-batch together under torch.func.vmap, or one at a time for "
        "models vmap cannot trace.",
        fallback=True,
    )
    chunk_size: int | None = setting(
        "Tasks per vectorised pass, each back-propagated before the next; memory grows with it.",
        default_text="the whole meta-batch for sinusoid and on a GPU; for images on a CPU as "
        f"many tasks as fit in {CPU_IMAGES_PER_PASS} images",
    )

    def resolve(self, run, device: str) -> InnerLoopSettings:
        values = dataclasses.asdict(self)
        if values["eval_inner_steps"] is None:
            values["eval_inner_steps"] = values["inner_steps"]
        if values["chunk_size"] is None:
            examples = run.train_ways * (run.shots + run.train_queries)
            images = get_dataset(run.dataset).images
            values["chunk_size"] = default_chunk_size(images, run.meta_batch, examples, device)
        return type(self)(**values)

    def learner_arguments(self, problem: Problem) -> dict[str, Any]:
        """Keyword arguments of `GradientLearner` that come straight from these settings."""
        return dict(
            inner_steps=self.inner_steps,
            eval_inner_steps=self.eval_inner_steps,
            loss=problem.loss,
            vectorize=self.vectorize,
            chunk_size=self.chunk_size,
            batch_norm=self.batch_norm,
        )

    def check(self, run) -> None:
        super().check(run)
        # The run's resolved settings: the paper's values, fallbacks and `resolve`'s rules.
        assert self.inner_lr is not None and self.inner_steps is not None
        assert self.chunk_size is not None and self.eval_inner_steps is not None
        require_positive(
            inner_lr=self.inner_lr, inner_steps=self.inner_steps, chunk_size=self.chunk_size
        )
        if self.eval_inner_steps < 0:
            raise ConfigError(f"`eval_inner_steps` must be >= 0, got {self.eval_inner_steps}.")
        if run.train_ways != run.ways:
            raise ConfigError("this method's output layer has `ways` outputs; drop `train_ways`.")


@dataclass
class GradientSettings(InnerLoopSettings):
    """Settings of the methods that back-propagate through the inner loop."""

    first_order: bool | None = setting(
        "Treat inner gradients as constants (no second-order term).", fallback=False
    )
    checkpoint_inner: bool | None = setting(
        "Activation checkpointing in meta-training: each second-order inner step, and the query "
        "pass block by block, is recomputed in the backward pass instead of kept; the same "
        "meta-gradient in less memory, for more time (docs/performance.md).",
        fallback=False,
    )

    def learner_arguments(self, problem: Problem) -> dict[str, Any]:
        return {
            **super().learner_arguments(problem),
            "first_order": self.first_order,
            "checkpoint_inner": self.checkpoint_inner,
        }


@dataclass(frozen=True)
class Method:
    """A registered method.

    `defaults` maps a dataset ("sinusoid", "omniglot") to the paper's values of run options
    (shots, meta_batch, iterations, ...) and of the method's settings; other datasets borrow
    them (`Dataset.defaults_from`: image folders and tables take Omniglot's). A dataset that
    finds none is one the method does not handle. `batch_norm` is the batch-norm policy its
    paper evaluated with.
    """

    name: str
    algorithm: type[Algorithm]
    settings: type[Settings]
    paper: str
    build: Callable[[Any, Problem], Algorithm]
    defaults: dict[str, dict[str, Any]]
    batch_norm: str

    def defaults_for(self, dataset: Dataset) -> dict[str, Any]:
        """The paper's values this method takes for `dataset`."""
        for key in dataset.defaults_from:
            if key in self.defaults:
                return self.defaults[key]
        raise ConfigError(
            f"{self.name} does not handle `dataset={dataset.name}`; use `dataset` "
            + handled_datasets(self.defaults)
        )


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]
