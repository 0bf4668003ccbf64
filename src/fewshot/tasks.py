"""Few-shot tasks and the sampler that draws them from labelled data held in memory.

A task (episode) has a support set to adapt on and a query set to evaluate on. A meta-batch is
the same structure with a leading task dimension, so every algorithm takes one type.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
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
        """The same tasks with every tensor on `device`."""
        return Task(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(support_x, support_y, query_x, query_y), in that order."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    def __len__(self) -> int:
        """Number of tasks in a meta-batch."""
        return self.support_x.shape[0]

    def __getitem__(self, index: int | slice) -> Task:
        """Task `index` of a meta-batch (or a smaller meta-batch for a slice)."""
        return Task(*(t[index] for t in self.tensors()))


@dataclass(frozen=True)
class Support:
    """The labelled examples of one new task: inputs (n, ...), labels (n,) in
    0..len(classes)-1, and the classes' names (e.g. the folders they were read from)."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"a support set of {len(self.x)} inputs has {len(self.y)} labels.")
        if len(self.classes) < 2:
            raise DataError(f"a support set needs at least 2 classes, got {len(self.classes)}.")
        counts = torch.bincount(self.y, minlength=len(self.classes))
        if len(counts) > len(self.classes) or int(self.y.min()) < 0:
            raise DataError(f"support labels must lie in 0..{len(self.classes) - 1}.")
        if (counts == 0).any():
            empty = self.classes[int((counts == 0).nonzero()[0])]
            raise DataError(f"class {empty!r} has no example in the support set.")
        object.__setattr__(self, "x", as_float(self.x))  # uint8 images scale to [0, 1]


@dataclass(frozen=True)
class ClassIndex:
    """Where each class's examples lie in a labelled dataset, without moving them.

    Classes are the sorted distinct labels; class c's examples are positions `offsets[c]` to
    `offsets[c] + counts[c] - 1` of the class-sorted order, and `rows` maps such positions to
    rows of the inputs, which are never copied (a large dataset, or a memory-mapped one, stays
    one copy).
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    order: torch.Tensor | None  # class-sorted position -> row; None where rows are sorted

    @classmethod
    def of(cls, inputs: torch.Tensor, labels: torch.Tensor) -> ClassIndex:
        if len(inputs) != len(labels):
            raise DataError(f"got {len(inputs)} inputs but {len(labels)} labels.")
        classes, labels = torch.unique(labels, return_inverse=True)
        counts = torch.bincount(labels, minlength=len(classes))
        already_sorted = bool((labels[1:] >= labels[:-1]).all())
        order = None if already_sorted else torch.argsort(labels, stable=True)
        return cls(counts, torch.cumsum(counts, 0) - counts, order)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """The rows of the inputs at class-sorted `positions`."""
        return positions if self.order is None else self.order.index_select(0, positions)


class TaskSampler:
    """Draws N-way K-shot episodes with Q queries per class from a labelled dataset in memory
    (or memory-mapped: only the examples of an episode are read, and `inputs` is never copied).

    Classes are drawn without replacement from the given data only (one split), and within each
    class the support and query examples are drawn without replacement, so they are disjoint.
    Every draw comes from the `torch.Generator` passed in, so a seed reproduces the episodes.

    Args:
        inputs: examples, shape (n, ...); images may be uint8 and are scaled to [0, 1] floats.
        labels: integer class of each example, shape (n,).
        ways: N, classes per episode.
        shots: K, support examples per class.
        queries: Q, query examples per class.
        option_names: the parameters that error messages name for "ways", "shots" and
            "queries" (e.g. "train_ways" for training episodes) [default: as here].
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        ways: int,
        shots: int,
        queries: int,
        option_names: dict[str, str] | None = None,
        transform: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
    ) -> None:
        require_positive(ways=ways, shots=shots, queries=queries)
        self.transform = transform
        # Episodes draw positions in the class-sorted order, then read those rows of `inputs`.
        self.index = ClassIndex.of(inputs, labels)
        counts = self.counts = self.index.counts
        self.offsets = self.index.offsets
        check_episode_fits(ways, shots, queries, counts, option_names)
        self.inputs = inputs
        self.ways, self.shots, self.queries = ways, shots, queries
        # Added to an example's random key: 0 for a class's real examples, 2 (past every key)
        # for the slots beyond its size, so a smallest-keys draw never picks them. Not needed
        # where all classes have the same size (Omniglot).
        self._longest = int(counts.max())
        slots = torch.arange(self._longest)
        padding = (slots >= counts.unsqueeze(1)).float().mul_(2.0)
        self._padding = padding if padding.any() else None
        # Reorders a task's (class, example) picks so that all support picks come first, then
        # all query picks, each class-major: the support and query sets are then contiguous
        # slices of one gather.
        slot = torch.arange(ways * (shots + queries)).view(ways, shots + queries)
        self._support_first = torch.cat((slot[:, :shots].flatten(), slot[:, shots:].flatten()))
        self._support_y = torch.arange(ways).repeat_interleave(shots)
        self._query_y = torch.arange(ways).repeat_interleave(queries)

    @property
    def num_classes(self) -> int:
        """How many classes the sampler draws its episodes' classes from."""
        return len(self.counts)

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> Task:
        """A meta-batch of `num_tasks` episodes: support tensors shaped (tasks, ways * shots,
        ...), query tensors (tasks, ways * queries, ...).

        The labels are broadcast views (read-only): clone them before changing them in place.
        """
        # Written as few torch calls as possible: at these sizes an episode's cost is the
        # per-call overhead, not the arithmetic.
        t, n, k, q = num_tasks, self.ways, self.shots, self.queries
        classes = self._draw_classes(t, generator).flatten()
        # k + q distinct examples of each class: the k + q smallest of random keys over the
        # class's examples, in random order.
        keys = torch.rand(t * n, self._longest, generator=generator)
        if self._padding is not None:
            keys.add_(self._padding.index_select(0, classes))
        picks = keys.topk(k + q, dim=1, largest=False).indices
        picks.add_(self.offsets.index_select(0, classes).unsqueeze(1))
        picks = picks.view(t, n * (k + q)).index_select(1, self._support_first).flatten()
        x = self.inputs.index_select(0, self.index.rows(picks))
        x = as_float(x).view(t, n * (k + q), *self.inputs.shape[1:])
        if self.transform is not None:  # an image folder's augmentation and standardisation
            x = self.transform(x, generator)
        return Task(
            support_x=x[:, : n * k],
            support_y=self._support_y.expand(t, -1),
            query_x=x[:, n * k :],
            query_y=self._query_y.expand(t, -1),
        )

    def _draw_classes(self, t: int, generator: torch.Generator | None) -> torch.Tensor:
        """n distinct classes per task, in random order, uniformly: shape (t, n).

        Where a repeat is unlikely, n independent uniform draws are kept if no task got a class
        twice (rejection sampling: given no repeat, they are uniform over distinct n-tuples);
        otherwise, and where repeats are likely, the n largest of uniform keys over all classes.
        """
        n = self.ways
        if t * n * (n - 1) < self.num_classes // 2:  # repeat probability below about 1/4
            classes = torch.randint(self.num_classes, (t, n), generator=generator)
            if not _has_repeat_per_row(classes):
                return classes
        keys = torch.rand(t, self.num_classes, generator=generator)
        return keys.topk(n, dim=1).indices


@dataclass(frozen=True)
class Batch:
    """An ordinary mini-batch of examples with their dataset-wide labels (or regression
    targets), for methods that pretrain without episodes (Baseline, fine-tuning)."""

    x: torch.Tensor
    y: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with both tensors on `device`."""
        return Batch(self.x.to(device), self.y.to(device))

    def __len__(self) -> int:
        return len(self.x)


class ExampleSampler:
    """Draws mini-batches of examples uniformly, with replacement, from all classes of a
    labelled dataset; labels are the classes' indices 0..num_classes-1 (sorted class ids).

    The non-episodic data source of the training loop: `sample(batch_size, generator)` plays
    the part of `TaskSampler.sample(num_tasks, generator)`.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
    ) -> None:
        self.transform = transform
        if len(inputs) != len(labels):
            raise DataError(f"got {len(inputs)} inputs but {len(labels)} labels.")
        if len(inputs) == 0:
            raise DataError("the training part holds no examples.")
        classes, self.labels = torch.unique(labels, return_inverse=True)
        self.inputs = inputs
        self.num_classes = len(classes)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """`batch_size` examples drawn uniformly with replacement, with the sampler's
        transform (augmentation) applied to the inputs."""
        picks = torch.randint(len(self.inputs), (batch_size,), generator=generator)
        x = as_float(self.inputs[picks])
        return Batch(
            x if self.transform is None else self.transform(x, generator), self.labels[picks]
        )


def check_episode_fits(
    ways: int,
    shots: int,
    queries: int,
    counts: torch.Tensor,
    option_names: dict[str, str] | None = None,
) -> None:
    """Refuse episodes that data of `counts` examples per class cannot fill, or that cannot be
    answered wrongly (one way), naming the options to change as `option_names` calls them."""
    names = {"ways": "ways", "shots": "shots", "queries": "queries", **(option_names or {})}
    w, s, q = (f"`{names[key]}`" for key in ("ways", "shots", "queries"))
    if ways < 2:  # every answer in a one-class episode is right: 100% that means nothing
        raise ConfigError(
            f"{w}={ways} makes episodes of one class, which every model gets right; set {w} "
            "to 2 or more."
        )
    classes = len(counts)
    if classes < 2:
        raise DataError(
            f"this split has {classes} class(es), and an episode needs at least 2 to choose "
            "between; add classes to it."
        )
    if ways > classes:
        raise ConfigError(
            f"{w}={ways} is larger than the {classes} classes in this split; set {w} to "
            f"{classes} or fewer."
        )
    smallest = int(counts.min())
    if shots + queries > smallest:
        raise ConfigError(
            f"{s} + {q} = {shots + queries} is more than the {smallest} examples of the smallest "
            f"class; lower {s} or {q}."
        )


def _has_repeat_per_row(values: torch.Tensor) -> bool:
    if len(values) == 1:  # one task: a Python set beats a sort at this size
        return len(set(values[0].tolist())) < values.shape[1]
    ordered = values.sort(dim=1).values
    return bool((ordered[:, 1:] == ordered[:, :-1]).any())


def stream_generator(purpose: str, seed: int) -> torch.Generator:
    """A generator for one purpose ("train", "eval"), so that e.g. meta-training and evaluation
    with the same seed never draw the same tasks (which matters where tasks are continuous, as
    for sinusoids, and keeps validation independent of training everywhere)."""
    digest = hashlib.sha256(f"fewshot:{purpose}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# 0-dim float32: uint8 images divided by it become float32 in one call.
_UINT8_SCALE = torch.tensor(255.0, dtype=torch.float32)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images scaled to [0, 1] float32; other inputs as float32."""
    return torch.div(x, _UINT8_SCALE) if x.dtype == torch.uint8 else x.float()
