"""Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang 2019, "A Closer Look at Few-shot
Classification").

Both pretrain a network as an ordinary classifier over all meta-training classes, then fit a
new head on each test episode's support set with the body frozen. Baseline's head is linear;
Baseline++'s is a cosine classifier, whose logits are scaled cosine similarities,

    logit_j(x) = s * g_j * cos(x, v_j),

with a learned direction v_j and norm g_j per class (weight normalisation) and a fixed scale s
(2 for up to 200 classes, else 10, as in the authors' code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fewshot.algorithms.finetuning import (
    OMNIGLOT_PRETRAINING,
    SINUSOID_PRETRAINING,
    TransferLearner,
    TransferSettings,
    build_with_linear_heads,
    pretrained_parts,
)
from fewshot.algorithms.registry import Method, Problem, register

NORM_EPSILON = 1e-5  # added to ||x|| as in the authors' code


class CosineClassifier(nn.Module):
    """Baseline++'s head: logits s * g_j * cos(x, v_j) (weight-normalised v_j, learned g_j)."""

    def __init__(self, in_features: int, classes: int, scale: float | None = None) -> None:
        super().__init__()
        direction = nn.Linear(in_features, classes, bias=False).weight.detach()
        self.direction = nn.Parameter(direction.clone())
        self.norm = nn.Parameter(direction.norm(dim=1))  # weight norm's g starts at ||v||
        self.scale = (2.0 if classes <= 200 else 10.0) if scale is None else scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / (x.norm(dim=-1, keepdim=True) + NORM_EPSILON)
        # g_j / ||v_j|| scales the logits' columns, not the (classes x features) weight, and
        # ||v_j||^2 is a sum of squares: the fewest passes over the weight, forward and
        # backward (docs/parity.md, Baseline++'s time)
        column_scale = self.norm * self.direction.square().sum(dim=1).rsqrt()
        return self.scale * (x @ self.direction.T) * column_scale


class Baseline(TransferLearner):
    """Pretrain `classifier(body(x))`; per episode, fit a copy of `head` on the body's frozen
    features of the support set (`TransferLearner` has the fine-tuning options)."""

    def __init__(
        self, body: nn.Module, head: nn.Module, classifier: nn.Module | None = None, **options
    ) -> None:
        super().__init__(body, head, classifier, adapt_body=False, **options)


class BaselinePlusPlus(Baseline):
    """Baseline with cosine classifiers: a `ways`-way head per episode and a `classes`-way
    pretraining head on `features`-dimensional outputs of `body`."""

    def __init__(self, body: nn.Module, features: int, ways: int, classes: int, **options) -> None:
        super().__init__(
            body, CosineClassifier(features, ways), CosineClassifier(features, classes), **options
        )


@dataclass
class BaselineSettings(TransferSettings):
    pass


def build_baseline(settings: BaselineSettings, problem: Problem) -> Baseline:
    return build_with_linear_heads(Baseline, settings, problem)


def build_baseline_plus_plus(settings: BaselineSettings, problem: Problem) -> BaselinePlusPlus:
    body, _, features = pretrained_parts(problem)
    options = settings.fine_tuning(problem)
    assert settings.classes is not None  # `fit_data`'s: the training data's classes
    return BaselinePlusPlus(body, features, problem.ways, settings.classes, **options)


PAPER = "Chen, Liu, Kira, Wang & Huang 2019, A Closer Look at Few-shot Classification (ICLR)"
register(
    Method(
        name="baseline",
        algorithm=Baseline,
        settings=BaselineSettings,
        paper=PAPER,
        build=build_baseline,
        batch_norm="inductive",
        defaults={"omniglot": OMNIGLOT_PRETRAINING, "sinusoid": SINUSOID_PRETRAINING},
    )
)
register(
    Method(
        name="baseline++",
        algorithm=BaselinePlusPlus,
        settings=BaselineSettings,
        paper=PAPER,
        build=build_baseline_plus_plus,
        batch_norm="inductive",
        defaults={"omniglot": OMNIGLOT_PRETRAINING},
    )
)
