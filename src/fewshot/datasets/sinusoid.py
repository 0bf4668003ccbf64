"""Sinusoid regression tasks exactly as in Finn et al. (2017), section 5.1.

Each task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5.0], phase phi ~ U[0, pi] and inputs
x ~ U[-5, 5]; support and query points are drawn independently from the same task.
"""

from __future__ import annotations

import math

import torch

from fewshot.datasets.registry import Dataset, register
from fewshot.errors import ConfigError, require_positive
from fewshot.tasks import Batch, Task

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidTasks:
    """Sampler of sinusoid tasks with K support and Q query points each; same API as TaskSampler."""

    def __init__(self, shots: int = 10, queries: int = 10) -> None:
        require_positive(shots=shots, queries=queries)
        self.shots, self.queries = shots, queries

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> Task:
        """A meta-batch of tasks; x and y are shaped (tasks, points, 1)."""
        return self.sample_with_functions(num_tasks, generator)[0]

    def sample_with_functions(
        self, num_tasks: int, generator: torch.Generator | None = None
    ) -> tuple[Task, torch.Tensor, torch.Tensor]:
        """`sample`'s tasks (the same for the same generator state) with each task's amplitude
        and phase, shaped (tasks,), so that its whole function can be drawn (`sinusoid`)."""
        amplitude = _uniform((num_tasks, 1, 1), AMPLITUDE_RANGE, generator)
        phase = _uniform((num_tasks, 1, 1), PHASE_RANGE, generator)
        x = _uniform((num_tasks, self.shots + self.queries, 1), INPUT_RANGE, generator)
        y = sinusoid(x, amplitude, phase)
        k = self.shots
        task = Task(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
        return task, amplitude.flatten(), phase.flatten()


def sinusoid(x: torch.Tensor, amplitude, phase) -> torch.Tensor:
    """A sin(x - phi): the function of the task with that amplitude and phase."""
    return amplitude * torch.sin(x - phase)


class SinusoidExamples:
    """Points of random sinusoids, each from a task of its own: the non-episodic data of
    Finn et al.'s pretrained baseline, "a network trained to regress to random sinusoid
    functions" (section 5.1). Same API as `tasks.ExampleSampler`."""

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """x and y shaped (batch_size, 1)."""
        task = SinusoidTasks(shots=1, queries=1).sample(batch_size, generator)
        return Batch(task.support_x[:, 0], task.support_y[:, 0])


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator) -> torch.Tensor:
    low, high = bounds
    return torch.rand(shape, generator=generator) * (high - low) + low


def sinusoid_tasks(
    config, examples: bool
) -> tuple[SinusoidTasks | SinusoidExamples, SinusoidTasks]:
    """The training sampler (of examples for methods trained on them) and the held-out one.
    Sinusoid tasks are continuous: "held out" means never drawn in training, which the separate
    random streams of training and evaluation (`stream_generator`) ensure."""
    if config.sampler == "meta-dataset":
        raise ConfigError("Meta-Dataset's episodes are classification episodes, not sinusoids.")
    held_out = SinusoidTasks(config.shots, config.queries)
    train = SinusoidExamples() if examples else SinusoidTasks(config.shots, config.train_queries)
    return train, held_out


register(
    Dataset(
        "sinusoid",
        task="regression",
        inputs="vectors",
        network="sinusoid-mlp",
        defaults_from=("sinusoid",),
        tasks=sinusoid_tasks,
        one_thread=True,
    )
)
