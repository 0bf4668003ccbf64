"""Prototypical Networks (Snell, Swersky & Zemel, 2017).

Each class is represented by the mean embedding of its support examples, c_k; a query x is
classified by a softmax over negative squared Euclidean distances,

    p(y = k | x) ∝ exp(-||f(x) - c_k||^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewshot.algorithms.metric import MetricLearner
from fewshot.algorithms.registry import Method, Problem, Settings, register
from fewshot.errors import DataError


class ProtoNet(MetricLearner):
    """Prototypical Networks around any embedding network `encoder` (embeddings are flattened)."""

    def score(self, support_z, support_y, query_z):
        prototypes = class_means(support_z.flatten(2), support_y)
        return -squared_distances(query_z.flatten(2), prototypes)


def class_means(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task class means: (tasks, n, d) embeddings and (tasks, n) labels -> (tasks, ways, d)."""
    one_hot = F.one_hot(labels, int(labels.max()) + 1).to(embeddings.dtype)
    counts = one_hot.sum(1)
    if bool((counts == 0).any()):  # its prototype would be 0/0: NaN distances, NaN loss
        task, label = (counts == 0).nonzero()[0].tolist()
        raise DataError(
            f"class {label} has no support example in task {task}; labels must be 0..ways-1, "
            "each with at least one support example."
        )
    return one_hot.transpose(1, 2) @ embeddings / counts.unsqueeze(-1)


def squared_distances(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """||q - c||^2 for every query and prototype: (tasks, q, d), (tasks, k, d) -> (tasks, q, k)."""
    return (query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)


@dataclass
class ProtoNetSettings(Settings):
    pass


def build(settings: ProtoNetSettings, problem: Problem) -> ProtoNet:
    # Resolved settings: the paper's values or the fallbacks.
    assert settings.batch_norm is not None
    encoder = problem.network(head=False, track_running_stats=True)
    return ProtoNet(encoder, batch_norm=settings.batch_norm)


# Snell et al. 2017, sec. 3.1: Omniglot trained with 60-way episodes of 5 queries per class,
# Adam 1e-3; evaluation with running batch-norm statistics (their code calls model.eval()).
register(
    Method(
        name="protonet",
        algorithm=ProtoNet,
        settings=ProtoNetSettings,
        paper="Snell, Swersky & Zemel 2017, Prototypical Networks for Few-shot Learning (NeurIPS)",
        build=build,
        batch_norm="inductive",
        defaults={
            "omniglot": dict(
                shots=1,
                queries=15,
                train_ways=60,
                train_queries=5,
                meta_batch=1,
                outer_lr=1e-3,
                iterations=20000,
                val_every=500,
            ),
            # Snell et al., sec. 3.2: 30-way training episodes for 1-shot, 15 queries per
            # class; they halve Adam's rate every 2,000 episodes and stop early, fewshot keeps
            # it constant for 20,000 episodes and keeps the best validated weights.
            "mini-imagenet": dict(
                shots=1,
                queries=15,
                train_ways=30,
                train_queries=15,
                meta_batch=1,
                outer_lr=1e-3,
                iterations=20000,
                val_every=500,
            ),
        },
    )
)
