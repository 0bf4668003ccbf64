"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, 2017).

For a meta-batch of tasks i with support and query sets, MAML minimises over the initial
parameters theta

    sum_i L_query_i(phi_i),   phi_i = theta - alpha * grad_theta L_support_i(theta)

(with several inner steps, the update is repeated from phi_i). The meta-gradient flows through
the inner updates, Hessian-vector products included; `first_order=True` treats the inner
gradients as constants (FOMAML). MAML is the shared inner loop (`GradientLearner`) with one
fixed step size (`rules.SGD`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fewshot.algorithms.gradient import GradientLearner
from fewshot.algorithms.recipes import FINN_2017
from fewshot.algorithms.registry import GradientSettings, Method, Problem, register
from fewshot.algorithms.rules import SGD


class MAML(GradientLearner):
    """MAML around any `nn.Module`, called functionally through `torch.func.functional_call`.

    Args:
        model: the network; its parameters are the meta-learned initialisation theta. MAML
            trains a copy (`maml.model`); the module passed in is left as it was.
        inner_lr: alpha, the step size of the inner (adaptation) updates.
        options: `GradientLearner`'s keyword arguments (inner_steps, eval_inner_steps,
            first_order, loss, adapted, meta_learned, vectorize, chunk_size, batch_norm).
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, **options: Any) -> None:
        super().__init__(model, SGD(inner_lr), **options)
        self.inner_lr = inner_lr


@dataclass
class MAMLSettings(GradientSettings):
    pass


def build(settings: MAMLSettings, problem: Problem) -> MAML:
    # Resolved settings: the paper's values or the fallbacks.
    assert settings.inner_lr is not None
    return MAML(
        problem.network(),
        inner_lr=settings.inner_lr,
        **settings.learner_arguments(problem),
    )


register(
    Method(
        name="maml",
        algorithm=MAML,
        settings=MAMLSettings,
        paper="Finn, Abbeel & Levine 2017, Model-Agnostic Meta-Learning for Fast Adaptation of "
        "Deep Networks (ICML)",
        build=build,
        batch_norm="transductive",
        defaults=FINN_2017,
    )
)
