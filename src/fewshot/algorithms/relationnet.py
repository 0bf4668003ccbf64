"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales 2018).

The encoder maps images to feature maps; a class is the sum of its support examples' maps (the
paper) or their mean. A learned relation module g compares the concatenated maps of a class and
a query,

    r_{k, x} = g([pool_{i: y_i = k} f(x_i), f(x)])  in (0, 1),   pool = sum or mean,

and training regresses r to the one-hot labels with the mean squared error, as in the paper,
rather than classifying with a softmax. A sum grows with the class's shots, so a module trained
on 1-shot sums meets maps several times larger when a class has more shots (Meta-Dataset's
episodes); the mean keeps them on the scale it was trained on (`support_pooling`). With one
shot per class the two are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.metric import MetricLearner
from fewshot.algorithms.registry import Method, Problem, Settings, register, setting
from fewshot.datasets.registry import get_dataset
from fewshot.errors import ConfigError
from fewshot.models import RelationEncoder, conv_block


class RelationModule(nn.Module):
    """g: two conv blocks (padded, pooled) over the 2C-channel pair, then C*s*s -> hidden -> 1
    fully connected layers, ReLU then sigmoid (the paper's Omniglot module, hidden = 8)."""

    def __init__(self, feature_shape: tuple[int, int, int], hidden: int = 8) -> None:
        super().__init__()
        channels, side, _ = feature_shape
        self.features = nn.Sequential(
            conv_block(2 * channels, channels, True), conv_block(channels, channels, True)
        )
        side = side // 2 // 2
        self.fc1 = nn.Linear(channels * max(side, 1) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """Relation scores of (n, 2C, H, W) concatenated pairs, shape (n,)."""
        hidden = F.relu(self.fc1(self.features(pairs).flatten(1)))
        return torch.sigmoid(self.fc2(hidden)).squeeze(-1)


# How a class's support maps are pooled: sum (the paper's) or mean (the default, chosen by
# measurement: docs/methods/relationnet.md).
POOLINGS = ("sum", "mean")
RELATION_POOLING = "mean"


def check_pooling(pooling: str | None) -> str:
    if pooling not in POOLINGS:
        raise ConfigError(f"support_pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}.")
    return pooling


class RelationNet(MetricLearner):
    """Relation Networks: `encoder` returns feature maps of shape `feature_shape` (C, H, W)."""

    def __init__(
        self,
        encoder: nn.Module,
        feature_shape: tuple[int, int, int],
        hidden: int = 8,
        batch_norm: str = "inductive",
        support_pooling: str = RELATION_POOLING,
    ) -> None:
        super().__init__(encoder, batch_norm)
        self.relation = RelationModule(feature_shape, hidden)
        self.support_pooling = check_pooling(support_pooling)

    def score(self, support_z, support_y, query_z):
        """Relation scores (tasks, queries, ways), each in (0, 1).

        Each task's pairs go through the relation module in a pass of their own, so that its
        batch norm, in training mode, normalises them apart from other tasks' (as the encoder
        does a task's examples): a task's scores never depend on the others in its batch."""
        ways = int(support_y.max()) + 1
        one_hot = F.one_hot(support_y, ways).to(support_z.dtype)  # (tasks, n, ways)
        if self.support_pooling == "mean":
            one_hot = one_hot / one_hot.sum(1, keepdim=True).clamp(min=1)
        classes = torch.einsum("tnk,tn...->tk...", one_hot, support_z)  # pooled per class
        tasks, q = query_z.shape[:2]
        pairs = torch.cat(
            [
                classes.unsqueeze(1).expand(tasks, q, *classes.shape[1:]),
                query_z.unsqueeze(2).expand(tasks, q, ways, *query_z.shape[2:]),
            ],
            dim=3,
        )
        return torch.stack([self.relation(task.flatten(0, 1)) for task in pairs]).view(
            tasks, q, ways
        )

    def query_loss(self, scores: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the relation scores against one-hot labels."""
        return F.mse_loss(scores, F.one_hot(query_y, scores.shape[-1]).to(scores.dtype))

    def configure_optimizers(self, lr, iterations):
        """Adam, its rate halved every 100,000 episodes (the paper's schedule)."""
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 100_000, gamma=0.5)


@dataclass
class RelationNetSettings(Settings):
    relation_hidden: int | None = setting(
        "Units of the relation module's hidden fully connected layer.", fallback=8
    )
    support_pooling: str | None = setting(
        "How a class's support feature maps are pooled before the relation module: sum (the "
        "paper's; grows with the shots) or mean (the same for 1 shot).",
        fallback=RELATION_POOLING,
        choices=POOLINGS,
        recorded_before="sum",
    )

    def check(self, run) -> None:
        super().check(run)
        check_pooling(self.support_pooling)
        if not get_dataset(run.dataset).images:
            raise ConfigError(
                "relationnet compares convolutional feature maps and does not handle "
                f"`dataset={run.dataset}`; use protonet, matchingnet or a gradient-based method."
            )


def build(settings: RelationNetSettings, problem: Problem) -> RelationNet:
    if problem.backbone != "conv4" or problem.freeze:
        raise ConfigError(
            "relationnet has its own embedding module (Sung et al.'s, feature maps for its "
            f"relation module); drop `{'freeze' if problem.freeze else 'backbone'}`."
        )
    assert problem.channels is not None and problem.image_size is not None  # images'
    # Resolved settings: the paper's values or the fallbacks.
    assert settings.relation_hidden is not None and settings.batch_norm is not None
    assert settings.support_pooling is not None
    encoder = RelationEncoder(problem.channels, image_size=problem.image_size)
    return RelationNet(
        encoder,
        encoder.output_shape,
        settings.relation_hidden,
        batch_norm=settings.batch_norm,
        support_pooling=settings.support_pooling,
    )


# Sung et al. 2018, sec. 4.1: Omniglot 5-way 1-shot episodes with 19 queries per class, Adam
# 1e-3 halved every 100,000 episodes, 1,000,000 episodes.
RELATIONNET_OMNIGLOT = dict(
    shots=1,
    queries=15,
    train_queries=19,
    meta_batch=1,
    outer_lr=1e-3,
    iterations=1000000,
    val_every=5000,
)
register(
    Method(
        name="relationnet",
        algorithm=RelationNet,
        settings=RelationNetSettings,
        paper="Sung, Yang, Zhang, Xiang, Torr & Hospedales 2018, Learning to Compare: Relation "
        "Network for Few-Shot Learning (CVPR)",
        build=build,
        batch_norm="inductive",
        defaults={
            "omniglot": RELATIONNET_OMNIGLOT,
            # Sung et al.'s miniImageNet 1-shot script: 15 queries per class, 500,000 episodes,
            # Adam at 1e-3 halved every 100,000 (`configure_optimizer`).
            "mini-imagenet": {**RELATIONNET_OMNIGLOT, "train_queries": 15, "iterations": 500000},
        },
    )
)
