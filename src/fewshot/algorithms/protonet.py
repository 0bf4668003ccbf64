"""Prototypical Networks (Snell, Swersky & Zemel, 2017).

Each class is represented by the mean embedding of its support examples, c_k; a query x is
classified by a softmax over negative squared Euclidean distances,

    p(y = k | x) ∝ exp(-||f(x) - c_k||^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import Algorithm
from fewshot.tasks import Task


class ProtoNet(Algorithm):
    """Prototypical Networks around any embedding network `encoder`."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def meta_loss(self, tasks: Task) -> torch.Tensor:
        logits = self.predict(tasks)
        return F.cross_entropy(logits.flatten(0, 1), tasks.query_y.flatten())

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        support, query = self._embed(tasks.support_x, tasks.query_x)
        prototypes = class_means(support, tasks.support_y)
        return -squared_distances(query, prototypes)

    def _embed(self, support_x: torch.Tensor, query_x: torch.Tensor):
        # One pass over support and query keeps batch-norm statistics shared between them.
        tasks, n_support = support_x.shape[:2]
        z = self.encoder(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)]))
        z = z.flatten(1)
        return z[: tasks * n_support].unflatten(0, (tasks, n_support)), z[
            tasks * n_support :
        ].unflatten(0, (tasks, -1))


def class_means(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task class means: (tasks, n, d) embeddings and (tasks, n) labels -> (tasks, ways, d)."""
    one_hot = F.one_hot(labels, int(labels.max()) + 1).to(embeddings.dtype)
    return one_hot.transpose(1, 2) @ embeddings / one_hot.sum(1).unsqueeze(-1)


def squared_distances(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """||q - c||^2 for every query and prototype: (tasks, q, d), (tasks, k, d) -> (tasks, q, k)."""
    return (query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)
