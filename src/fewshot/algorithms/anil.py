"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, 2020).

Only the head adapts in the inner loop; the body f is meta-learned in the outer loop alone:

    phi_i = w - alpha * grad_w L_support_i(w; f_theta(x)),
    min over (theta, w) of sum_i L_query_i(phi_i; f_theta(x)),

The body's features are computed once per task, before the inner loop, which makes ANIL much
cheaper than MAML; the meta-gradient still reaches the body through the features (second order
unless `first_order`). The shared inner loop (`GradientLearner`) with the body as its encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fewshot.algorithms.gradient import GradientLearner
from fewshot.algorithms.recipes import FINN_2017
from fewshot.algorithms.registry import GradientSettings, Method, Problem, register
from fewshot.algorithms.rules import SGD
from fewshot.models import body_and_head


class ANIL(GradientLearner):
    """ANIL: `head(body(x))`, with only `head` adapted per task.

    Args:
        body: the feature extractor, meta-learned only (a copy is trained, as `anil.encoder`).
        head: the final layer(s), adapted in the inner loop (`anil.model`).
        inner_lr: alpha, the inner step size of the head.
        options: `GradientLearner`'s keyword arguments (inner_steps, eval_inner_steps,
            first_order, loss, vectorize, chunk_size, batch_norm).
    """

    def __init__(
        self, body: nn.Module, head: nn.Module, inner_lr: float = 0.4, **options: Any
    ) -> None:
        super().__init__(head, SGD(inner_lr), encoder=body, **options)
        self.inner_lr = inner_lr


@dataclass
class ANILSettings(GradientSettings):
    pass


def build(settings: ANILSettings, problem: Problem) -> ANIL:
    # Resolved settings: the paper's values or the fallbacks.
    assert settings.inner_lr is not None
    model = problem.network()
    return ANIL(
        *body_and_head(model),
        inner_lr=settings.inner_lr,
        **settings.learner_arguments(problem),
    )


# Raghu et al. keep MAML's hyper-parameters (their sec. 4 and appendix).
register(
    Method(
        name="anil",
        algorithm=ANIL,
        settings=ANILSettings,
        paper="Raghu, Raghu, Bengio & Vinyals 2020, Rapid Learning or Feature Reuse? Towards "
        "Understanding the Effectiveness of MAML (ICLR)",
        build=build,
        batch_norm="transductive",
        defaults=FINN_2017,
    )
)
