"""Few-shot tasks and the sampler that draws them from labelled data held in memory.

A task (episode) has a support set to adapt on and a query set to evaluate on. A meta-batch is
the same structure with a leading task dimension, so every algorithm takes one type.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from fewshot.errors import ConfigError, DataError, require_positive


@dataclass(frozen=True)
class Task:
    """One episode, or a meta-batch of episodes when every tensor has a leading task dimension.

    For classification, labels are remapped to 0..ways-1 inside each task.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str) -> Task:
        return Task(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    def __len__(self) -> int:
        """Number of tasks in a meta-batch."""
        return self.support_x.shape[0]

    def __getitem__(self, index: int | slice) -> Task:
        """Task `index` of a meta-batch (or a smaller meta-batch for a slice)."""
        return Task(*(t[index] for t in self.tensors()))


class TaskSampler:
    """Draws N-way K-shot episodes with Q queries per class from a labelled dataset in memory.

    Classes are drawn without replacement from the given data only (one split), and within each
    class the support and query examples are drawn without replacement, so they are disjoint.
    Every draw comes from the `torch.Generator` passed in, so a seed reproduces the episodes.

    Args:
        inputs: examples, shape (n, ...); images may be uint8 and are scaled to [0, 1] floats.
        labels: integer class of each example, shape (n,).
        ways, shots, queries: N, K and Q.
    """

    def __init__(
        self, inputs: torch.Tensor, labels: torch.Tensor, ways: int, shots: int, queries: int
    ) -> None:
        require_positive(ways=ways, shots=shots, queries=queries)
        if len(inputs) != len(labels):
            raise DataError(f"got {len(inputs)} inputs but {len(labels)} labels.")
        classes, labels = torch.unique(labels, return_inverse=True)
        counts = torch.bincount(labels, minlength=len(classes))
        if ways > len(classes):
            raise ConfigError(
                f"ways={ways} is larger than the {len(classes)} classes in this split; "
                f"use --ways {len(classes)} or fewer."
            )
        needed = shots + queries
        if needed > int(counts.min()):
            raise ConfigError(
                f"shots + queries = {needed} is more than the {int(counts.min())} examples of the "
                "smallest class; lower --shots or --queries."
            )
        order = torch.argsort(labels, stable=True)
        self.inputs = inputs[order]
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts
        self.ways, self.shots, self.queries = ways, shots, queries

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> Task:
        """A meta-batch of `num_tasks` episodes, tensors shaped (tasks, ways * shots, ...)."""
        t, n, k, q = num_tasks, self.ways, self.shots, self.queries
        # The n largest of uniform keys: n distinct classes in random order, in O(classes).
        keys = torch.rand(t, self.num_classes, generator=generator)
        classes = keys.topk(n, dim=1, sorted=True).indices
        counts = self.counts[classes]
        # Draw k + q distinct examples per class in one vectorised step: random keys, with the
        # slots beyond a class's size pushed to the end, then the first k + q after sorting.
        longest = int(self.counts.max())
        keys = torch.rand(t, n, longest, generator=generator)
        keys.masked_fill_(torch.arange(longest) >= counts.unsqueeze(-1), 2.0)
        picks = keys.argsort(dim=-1)[..., : k + q] + self.offsets[classes].unsqueeze(-1)
        x = _as_float(self.inputs[picks])  # (t, n, k + q, ...)
        y = torch.arange(n).view(1, n, 1).expand(t, n, k + q)
        return Task(
            support_x=x[:, :, :k].flatten(1, 2),
            support_y=y[:, :, :k].flatten(1, 2),
            query_x=x[:, :, k:].flatten(1, 2),
            query_y=y[:, :, k:].flatten(1, 2),
        )


def stream_generator(purpose: str, seed: int) -> torch.Generator:
    """A generator for one purpose ("train", "eval"), so that e.g. meta-training and evaluation
    with the same seed never draw the same tasks (which matters where tasks are continuous, as
    for sinusoids, and keeps validation independent of training everywhere)."""
    digest = hashlib.sha256(f"fewshot:{purpose}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
