"""Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML with a learned step size for every coordinate.

    phi_i = theta - alpha ⊙ grad_theta L_support_i(theta),

where alpha has the shape of theta and is meta-learned together with it, by the same outer
optimizer on the same query loss: it learns the direction and size of the inner update, not
only the initialisation. The shared inner loop (`GradientLearner`) with `rules.PerCoordinateSGD`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from fewshot.algorithms.gradient import GradientLearner
from fewshot.algorithms.recipes import FINN_2017
from fewshot.algorithms.registry import (
    GradientSettings,
    Method,
    Problem,
    register,
)
from fewshot.algorithms.rules import PerCoordinateSGD


class MetaSGD(GradientLearner):
    """Meta-SGD around any `nn.Module`.

    Args:
        model: the network (a copy is trained; the module passed in is left as it was).
        inner_lr: the initial value of every coordinate's step size (`meta_sgd.rule.rates`).
        options: `GradientLearner`'s keyword arguments (inner_steps, eval_inner_steps,
            first_order, loss, adapted, meta_learned, vectorize, chunk_size, batch_norm).
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, **options: Any) -> None:
        super().__init__(model, partial(PerCoordinateSGD, lr=inner_lr), **options)


@dataclass
class MetaSGDSettings(GradientSettings):
    pass


def build(settings: MetaSGDSettings, problem: Problem) -> MetaSGD:
    # Resolved settings: the paper's values or the fallbacks.
    assert settings.inner_lr is not None
    return MetaSGD(
        problem.network(),
        inner_lr=settings.inner_lr,
        **settings.learner_arguments(problem),
    )


# Li et al. train with one inner step and adapt with one; the rest is MAML's setting.
_ONE_STEP = {
    "sinusoid": dict(eval_inner_steps=1),
    "omniglot": dict(eval_inner_steps=1),
    "mini-imagenet": dict(inner_steps=1, eval_inner_steps=1),
}
register(
    Method(
        name="meta-sgd",
        algorithm=MetaSGD,
        settings=MetaSGDSettings,
        paper="Li, Zhou, Chen & Li 2017, Meta-SGD: Learning to Learn Quickly for Few-Shot "
        "Learning (arXiv:1707.09835)",
        build=build,
        batch_norm="transductive",
        defaults={
            dataset: {**values, **_ONE_STEP[dataset]} for dataset, values in FINN_2017.items()
        },
    )
)
