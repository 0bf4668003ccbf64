"""Fine-tune everything: the plain transfer-learning reference.

Pretrain a network as an ordinary classifier over all meta-training classes (as Baseline does);
per test episode, attach a new linear head and fine-tune it and the whole body on the support
set, with Baseline's fine-tuning recipe. Where meta-learning does not beat this, it has not
earned its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fewshot.algorithms.finetuning import (
    OMNIGLOT_PRETRAINING,
    SINUSOID_PRETRAINING,
    TransferLearner,
    TransferSettings,
    build_with_linear_heads,
)
from fewshot.algorithms.registry import Method, Problem, register


class FineTune(TransferLearner):
    """Pretrain `classifier(body(x))`; per episode, fine-tune copies of `body` and `head`
    together on the support set (`TransferLearner` has the fine-tuning options)."""

    def __init__(
        self, body: nn.Module, head: nn.Module, classifier: nn.Module | None = None, **options
    ) -> None:
        super().__init__(body, head, classifier, adapt_body=True, **options)


@dataclass
class FineTuneSettings(TransferSettings):
    pass


def build(settings: FineTuneSettings, problem: Problem) -> FineTune:
    return build_with_linear_heads(FineTune, settings, problem)


register(
    Method(
        name="finetune",
        algorithm=FineTune,
        settings=FineTuneSettings,
        paper="the transfer-learning reference; fine-tuning recipe of Chen et al. 2019 (ICLR), "
        "sinusoid comparison of Finn et al. 2017 (ICML) sec. 5.1",
        build=build,
        batch_norm="inductive",
        defaults={"omniglot": OMNIGLOT_PRETRAINING, "sinusoid": SINUSOID_PRETRAINING},
    )
)
