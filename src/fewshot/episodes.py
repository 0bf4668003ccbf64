"""Meta-Dataset's episodes (Triantafillou et al. 2020, sec. 3.2 and appendix): a variable number
of ways and shots, class-imbalanced support sets, and, where classes come in groups (Omniglot's
alphabets), all classes of an episode from one group.

An episode over classes with n_c examples each is drawn as follows:

1. ways: N ~ U{min_ways, ..., min(max_ways, C)} over the C classes; with groups, a group is
   drawn uniformly first (among those with at least min_ways classes) and C is its size;
2. N of those classes, uniformly without replacement;
3. queries per class: q = min(max_queries, floor(min_c n_c / 2)), the same for every class;
4. support size: S = min(max_support, sum_c floor(beta * min(max_support_per_class, n_c - q) + 1)),
   beta ~ U[0, 1);
5. shots: K_c = min(floor(alpha_c * (S - N)) + 1, n_c - q), with alpha_c proportional to
   n_c * exp(w_c), w_c ~ U[log 1/2, log 2]: roughly in proportion to the class's size, with
   noise, and at least one.

The paper's defaults: min_ways 5, max_ways 50, max_queries 10, max_support 500,
max_support_per_class 100.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fewshot.errors import ConfigError, DataError
from fewshot.tasks import ClassIndex, Task, as_float


@dataclass(frozen=True)
class EpisodeShape:
    """What one Meta-Dataset episode holds: its classes (indices into the sampler's sorted
    classes), each class's shots, the queries per class, and the support size S drawn in step
    4 (the shots sum to S at most: their floors and caps only take away)."""

    classes: list[int]
    shots: list[int]
    queries: int
    support_size: int

    @property
    def ways(self) -> int:
        return len(self.classes)


class MetaDatasetSampler:
    """Draws Meta-Dataset episodes from a labelled dataset in memory (or memory-mapped); the
    inputs are never copied.

    `groups[i]` is the group of class `labels == i`'s sorted position (e.g. its alphabet), or
    None for classes drawn without a hierarchy. Episodes vary in size, so `sample` draws one
    at a time (`varies` tells the evaluator so). Every draw comes from the generator passed in.
    """

    varies = True

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor | None = None,
        min_ways: int = 5,
        max_ways: int = 50,
        max_queries: int = 10,
        max_support: int = 500,
        max_support_per_class: int = 100,
        transform: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
    ) -> None:
        self.index = ClassIndex.of(inputs, labels)  # inputs stay put, never copied
        self.counts, self.offsets = self.index.counts, self.index.offsets
        if not 2 <= min_ways <= max_ways:
            raise ConfigError(f"ways must satisfy 2 <= min_ways <= max_ways, got {min_ways}, "
                              f"{max_ways}.")  # fmt: skip
        if max_support < max_ways:
            raise ConfigError(f"max_support ({max_support}) must allow one shot per way "
                              f"(max_ways {max_ways}).")  # fmt: skip
        if int(self.counts.min()) < 2:
            raise DataError("every class needs 2 examples or more (a support and a query one).")
        self.inputs, self.transform = inputs, transform
        self.min_ways, self.max_ways, self.max_queries = min_ways, max_ways, max_queries
        self.max_support, self.max_support_per_class = max_support, max_support_per_class
        self.pools = self._class_pools(groups, len(self.counts))

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def _class_pools(self, groups: torch.Tensor | None, num_classes: int) -> list[torch.Tensor]:
        """The sets an episode's classes are drawn from: every class, or each group with at
        least min_ways classes."""
        if groups is None:
            pools = [torch.arange(num_classes)]
        else:
            if len(groups) != num_classes:
                raise DataError(f"got {len(groups)} groups for {num_classes} classes.")
            pools = [(groups == g).nonzero().flatten() for g in torch.unique(groups)]
        pools = [pool for pool in pools if len(pool) >= self.min_ways]
        if not pools:
            raise ConfigError(
                f"no {'group' if groups is not None else 'dataset'} has {self.min_ways} classes "
                f"or more, the fewest ways of an episode."
            )
        return pools

    def describe(self, generator: torch.Generator | None = None) -> EpisodeShape:
        """The classes, shots and queries of the next episode (steps 1-5 above)."""
        pool = self.pools[int(torch.randint(len(self.pools), (), generator=generator))]
        highest = min(self.max_ways, len(pool))
        ways = int(torch.randint(self.min_ways, highest + 1, (), generator=generator))
        chosen = pool[torch.randperm(len(pool), generator=generator)[:ways]]
        sizes = self.counts[chosen]
        queries = min(self.max_queries, int(sizes.min()) // 2)
        remaining = sizes - queries
        beta = float(torch.rand((), generator=generator, dtype=torch.float64))
        contributions = remaining.clamp(max=self.max_support_per_class).double()
        support = min(self.max_support, int(torch.floor(beta * contributions + 1).sum()))
        log_weights = torch.empty(ways, dtype=torch.float64).uniform_(
            math.log(0.5), math.log(2.0), generator=generator
        )
        weights = sizes.double() * log_weights.exp()
        proportions = weights / weights.sum()
        shots = (torch.floor(proportions * (support - ways)).long() + 1).minimum(remaining)
        return EpisodeShape(chosen.tolist(), shots.tolist(), queries, support)

    def sample(self, num_tasks: int = 1, generator: torch.Generator | None = None) -> Task:
        """One episode, with a task dimension of 1: the support set class by class (labels
        0..ways-1 in the order the classes were drawn), then `queries` queries per class."""
        if num_tasks != 1:
            raise ConfigError(
                "Meta-Dataset episodes differ in size, so they are drawn one at a time; use a "
                "meta-batch of 1."
            )
        shape = self.describe(generator)
        support, query = [], []
        for c, shots in zip(shape.classes, shape.shots):
            picks = torch.randperm(int(self.counts[c]), generator=generator)[
                : shots + shape.queries
            ]
            rows = self.index.rows(self.offsets[c] + picks)
            support.append(rows[:shots])
            query.append(rows[shots:])
        rows = torch.cat(support + query)
        x = as_float(self.inputs.index_select(0, rows)).unsqueeze(0)
        if self.transform is not None:
            x = self.transform(x, generator)
        n_support = sum(shape.shots)
        support_y = torch.arange(shape.ways).repeat_interleave(torch.tensor(shape.shots))
        query_y = torch.arange(shape.ways).repeat_interleave(shape.queries)
        return Task(x[:, :n_support], support_y[None], x[:, n_support:], query_y[None])
