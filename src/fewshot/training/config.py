"""The configuration of a training run, with the papers' defaults per method and dataset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from fewshot.errors import ConfigError, require_positive

ALGORITHMS = ("maml", "protonet")
DATASETS = ("sinusoid", "omniglot", "folder")
CPU_IMAGES_PER_PASS = 40  # support + query images one vectorised MAML pass takes on a CPU

# Settings of the papers: MAML (Finn et al. 2017, sec. 5) and Prototypical Networks (Snell et
# al. 2017, sec. 3.1, who train Omniglot with 60-way episodes of 5 queries per class).
PAPER_DEFAULTS: dict[tuple[str, str], dict] = {
    ("maml", "sinusoid"): dict(
        shots=10,
        queries=10,
        meta_batch=25,
        inner_lr=0.01,
        inner_steps=1,
        eval_inner_steps=10,
        outer_lr=1e-3,
        iterations=8000,
        val_every=2000,
    ),
    ("maml", "omniglot"): dict(
        shots=1,
        queries=15,
        meta_batch=32,
        inner_lr=0.4,
        inner_steps=1,
        eval_inner_steps=3,
        outer_lr=1e-3,
        iterations=60000,
        val_every=500,
    ),
    ("protonet", "omniglot"): dict(
        shots=1,
        queries=15,
        train_ways=60,
        train_queries=5,
        meta_batch=1,
        outer_lr=1e-3,
        iterations=20000,
        val_every=500,
    ),
}
# A user's image folder gets the Omniglot settings.
PAPER_DEFAULTS[("maml", "folder")] = PAPER_DEFAULTS[("maml", "omniglot")]
PAPER_DEFAULTS[("protonet", "folder")] = PAPER_DEFAULTS[("protonet", "omniglot")]


def default_chunk_size(
    dataset: str, meta_batch: int, examples_per_task: int, device: str = "cpu"
) -> int:
    """Tasks per vectorised MAML pass when the user does not say.

    The whole meta-batch for the small sinusoid MLP and on a GPU (fastest there). For images on
    a CPU, as many tasks as fit in `CPU_IMAGES_PER_PASS` support and query images: vectorising
    pays off where tasks are small (Finn et al.'s 5-way 1-shot 1-query Omniglot tasks, 10
    images: chunks of 4 ran ×1.24 faster than one task at a time, 477 MiB against 451), much
    less where they are large (15 queries per class, 80 images: chunks of 4 ran ×1.10 faster for
    2.3x the memory); benchmarks/results.md and results-15-queries.md.
    """
    if dataset == "sinusoid" or not device.startswith("cpu"):
        return meta_batch
    return max(1, min(meta_batch, CPU_IMAGES_PER_PASS // examples_per_task))


@dataclass
class TrainConfig:
    """Everything that defines a run; `None` means "the paper's default for this method"."""

    algorithm: str = "maml"
    dataset: str = "sinusoid"
    split: str = "vinyals"
    image_size: int = 28
    channels: int = 1
    ways: int = 5
    shots: int | None = None
    queries: int | None = None
    train_ways: int | None = None
    train_queries: int | None = None
    meta_batch: int | None = None
    inner_steps: int | None = None
    eval_inner_steps: int | None = None
    inner_lr: float | None = None
    outer_lr: float | None = None
    first_order: bool = False
    vectorize: bool | None = True
    chunk_size: int | None = None
    iterations: int | None = None
    val_every: int | None = None
    val_episodes: int = 200
    checkpoint_every: int = 100
    time_limit: float | None = None
    seed: int = 0

    def resolved(self, device: str = "cpu") -> TrainConfig:
        """A copy with every `None` replaced by its default for training on `device`, checked
        for consistency."""
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}."
            )
        if self.dataset not in DATASETS:
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}."
            )
        defaults = PAPER_DEFAULTS.get((self.algorithm, self.dataset))
        if defaults is None:
            raise ConfigError(
                f"{self.algorithm} is a classification method; use --dataset omniglot or folder."
            )
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in defaults.items():
            if values[name] is None:
                values[name] = value
        values["train_ways"] = values["train_ways"] or values["ways"]
        values["train_queries"] = values["train_queries"] or values["queries"]
        if values["vectorize"] is None:  # "auto" in config files of earlier versions
            values["vectorize"] = True
        if values["algorithm"] == "maml" and values["chunk_size"] is None:
            examples = values["train_ways"] * (values["shots"] + values["train_queries"])
            values["chunk_size"] = default_chunk_size(
                values["dataset"], values["meta_batch"], examples, device
            )
        if values["inner_steps"] is None:
            values["inner_steps"] = 1
        if values["eval_inner_steps"] is None:
            values["eval_inner_steps"] = values["inner_steps"]
        config = TrainConfig(**values)
        config.check()
        return config

    def check(self) -> None:
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
            image_size=self.image_size,
            channels=self.channels,
            outer_lr=self.outer_lr,
            time_limit=self.time_limit if self.time_limit is not None else 1,
        )
        if self.chunk_size is not None:
            require_positive(chunk_size=self.chunk_size)
        if self.dataset != "folder" and (self.image_size, self.channels) != (28, 1):
            raise ConfigError("--image-size and --channels apply to --dataset folder only.")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}.")
        if self.image_size < 16:
            raise ConfigError(
                f"image_size must be at least 16 (Conv4 halves it four times), got "
                f"{self.image_size}."
            )
        if self.algorithm == "maml":
            require_positive(inner_lr=self.inner_lr, inner_steps=self.inner_steps)
            if self.train_ways != self.ways:
                raise ConfigError("MAML's output layer has --ways outputs; drop --train-ways.")
            if self.eval_inner_steps < 0:
                raise ConfigError(f"eval_inner_steps must be >= 0, got {self.eval_inner_steps}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown configuration keys: {', '.join(unknown)}; known keys are "
                f"{', '.join(sorted(known))}."
            )
        return cls(**values)
