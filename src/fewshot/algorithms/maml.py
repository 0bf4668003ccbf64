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
    return MAML(
        problem.network(),
        inner_lr=settings.inner_lr,
        **settings.learner_arguments(problem),
    )


# Finn et al. 2017, sec. 5 and their code: sinusoid K = 10, 25 tasks, alpha = 0.01, 10 steps
# at test; Omniglot 5-way, 32 tasks, alpha = 0.4, 1 step in training and 3 at test.
MAML_DEFAULTS = {
    "sinusoid": dict(
        shots=10,
        queries=10,
        meta_batch=25,
        inner_lr=0.01,
        inner_steps=1,
        eval_inner_steps=10,
        outer_lr=1e-3,
        iterations=8000,
        val_every=2000,
    ),
    "omniglot": dict(
        shots=1,
        queries=15,
        meta_batch=32,
        inner_lr=0.4,
        inner_steps=1,
        eval_inner_steps=3,
        outer_lr=1e-3,
        iterations=60000,
        val_every=500,
    ),
    # Finn et al. 2017, sec. 5.2: 5 inner steps of 0.01 in training, 10 at test, 4 tasks per
    # meta-batch (the 1-shot setting), 15 queries per class; their 32-filter Conv4 is
    # `--backbone conv4-32` (the default, 64 filters, overfits sooner).
    "mini-imagenet": dict(
        shots=1,
        queries=15,
        meta_batch=4,
        inner_lr=0.01,
        inner_steps=5,
        eval_inner_steps=10,
        outer_lr=1e-3,
        iterations=60000,
        val_every=500,
    ),
}

register(
    Method(
        name="maml",
        algorithm=MAML,
        settings=MAMLSettings,
        paper="Finn, Abbeel & Levine 2017, Model-Agnostic Meta-Learning for Fast Adaptation of "
        "Deep Networks (ICML)",
        build=build,
        batch_norm="transductive",
        defaults=MAML_DEFAULTS,
    )
)
