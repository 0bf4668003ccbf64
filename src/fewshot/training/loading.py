"""A finished run folder read back: its trained method (`load`), and with it the test episodes
it is evaluated on (`load_run`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fewshot.algorithms.base import Algorithm
from fewshot.backbones import require_trusted
from fewshot.errors import ConfigError, require_positive
from fewshot.training import checkpoint
from fewshot.training.config import SAMPLERS, TrainConfig
from fewshot.training.factory import (
    TaskSources,
    build_algorithm,
    build_sources,
    has_per_way_head,
    recorded_preprocessing,
)


def override_test_episodes(config: TrainConfig, episode: dict | None) -> None:
    """Set the "ways", "shots", "queries" or "sampler" given (not None) in `episode` on
    `config`."""
    for name, value in (episode or {}).items():
        if value is None:
            continue
        if name == "sampler":
            if value not in SAMPLERS:
                raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {value!r}.")
        else:
            require_positive(**{name: value})
        setattr(config, name, value)


def load(
    run_dir: Path,
    device: str = "cpu",
    batch_norm: str | None = "inductive",
    episode: dict | None = None,
    trust_backbone: bool = False,
) -> Algorithm:
    """The trained method of a run folder, with its best weights, in eval mode, ready to
    `adapt` to new classes.

    `batch_norm` defaults to "inductive" so that a prediction never depends on the other inputs
    predicted with it (None keeps the run's policy). The method's `preprocessing` says how the
    run's training images were read (`Preprocessing.read` reads a user's images the same way);
    `max_ways` is the size of a per-class head, where it has one; `config` is the run's
    configuration, with `episode`'s "ways", "shots" or "queries" where given (`load_run`).

    A run whose backbone is built by a constructor (`backbone="module:callable"`) imports that
    module, which runs its code: it is refused unless `trust_backbone=True`.
    """
    run_dir = Path(run_dir)
    config = checkpoint.read_config(run_dir)
    require_trusted(config.backbone, trust_backbone, run_dir)
    with_batch_norm(config, batch_norm)
    trained_ways = config.ways
    per_way_head = has_per_way_head(config, built := build_algorithm(config))
    override_test_episodes(config, episode)
    overridden = any(value is not None for value in (episode or {}).values())
    algorithm = build_algorithm(config) if overridden else built
    weights = run_dir / checkpoint.BEST_WEIGHTS
    tensors = checkpoint.read_weights(weights)  # a missing or damaged file is no ways problem
    if per_way_head and config.ways != trained_ways:
        raise ConfigError(
            f"{run_dir} was trained {trained_ways}-way and its {config.algorithm} model has "
            f"one output per way; evaluate it {trained_ways}-way (drop `ways`)."
        )
    checkpoint.fit_weights(algorithm, tensors, weights)
    algorithm.max_ways = trained_ways if per_way_head else None
    algorithm.preprocessing = recorded_preprocessing(run_dir, config)
    algorithm.config = config
    return algorithm.to(device).eval()


def with_batch_norm(config: TrainConfig, policy: str | None) -> None:
    """Set the batch-norm policy `policy` (None: keep the run's) on a run's configuration."""
    if policy is not None:
        config.settings = dataclasses.replace(config.settings, batch_norm=policy)
        config.settings.check(config)  # a policy the method does not have is refused


def load_run(
    run_dir: Path,
    data_root=None,
    download: bool = False,
    device: str = "cpu",
    batch_norm: str | None = None,
    episode: dict | None = None,
    trust_backbone: bool = False,
) -> tuple[TrainConfig, Algorithm, TaskSources]:
    """The configuration, best weights and test-episode sampler of a finished run.

    `batch_norm` overrides the run's batch-norm policy at prediction (to measure its effect);
    `episode` overrides its test episodes' "ways", "shots" or "queries", where the trained
    model allows it (a method whose head has one output per way cannot change its ways);
    `trust_backbone` as `load`'s.
    """
    algorithm = load(run_dir, device, batch_norm, episode, trust_backbone)
    assert algorithm.config is not None  # `load` sets it
    sources = build_sources(algorithm.config, data_root, download, parts=("test",))
    return algorithm.config, algorithm, sources
