"""The fine-tuning family: plain transfer learning, the reference every meta-learner must beat.

A network is pretrained as an ordinary classifier on mini-batches of all meta-training classes
(`training_data = "examples"`): loss(classifier(body(x)), y). For each test episode a new
`ways`-way head is fitted on the support set (Baseline, Baseline++; Chen et al. 2019), or the
head and the whole body are (FineTune).

Fitting reuses the gradient-based inner loop (`GradientLearner.trajectory`): the rule is SGD
with momentum, dampening and weight decay (`rules.MomentumSGD`), each step takes a mini-batch of
the support set, and batch norm normalises with the running statistics of pretraining, so no
query's prediction depends on another's.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import Predictor, batch_norm_mode
from fewshot.algorithms.gradient import GradientLearner, GradientPredictor, LossFn
from fewshot.algorithms.gradient.inner_loop import steps_per_pass
from fewshot.algorithms.registry import Problem, Settings, setting
from fewshot.algorithms.rules import MomentumSGD
from fewshot.errors import ConfigError, require_positive
from fewshot.models import FeaturesAndHead, body_and_head
from fewshot.tasks import Batch


class TransferLearner(GradientLearner):
    """Pretrain `classifier(body(x))` on batches; adapt a copy of `head` (and of `body`, with
    `adapt_body`) to each support set by fine-tuning.

    Args:
        body: the feature extractor; its batch-norm layers keep running statistics.
        head: the head fitted per episode (`ways` outputs). Every episode starts it from the
            same initial weights, those it has here.
        classifier: the pretraining head over all training classes; None when `head` itself is
            pretrained (regression, where the task's output is the pretraining output).
        adapt_body: fine-tune the body too (FineTune), or only the head (Baseline).
        lr, momentum, dampening, weight_decay: the fine-tuning optimizer (`rules.MomentumSGD`).
        epochs: passes over the support set; batch: examples per fine-tuning step (None: the
            whole support set, so a step is an epoch).
    """

    training_data = "examples"
    whole_passes = True  # Chen et al.'s fine-tuning: each epoch's last mini-batch is smaller

    def __init__(
        self,
        body: nn.Module,
        head: nn.Module,
        classifier: nn.Module | None = None,
        *,
        adapt_body: bool,
        lr: float = 0.01,
        momentum: float = 0.9,
        dampening: float = 0.9,
        weight_decay: float = 1e-3,
        epochs: int = 100,
        batch: int | None = 4,
        loss: LossFn = F.cross_entropy,
        vectorize: bool = True,
    ) -> None:
        require_positive(epochs=epochs, **({} if batch is None else {"batch": batch}))
        rule = MomentumSGD(lr, momentum, dampening, weight_decay)
        model, encoder = (nn.Sequential(body, head), None) if adapt_body else (head, body)
        super().__init__(
            model,
            rule,
            eval_inner_steps=epochs,
            loss=loss,
            encoder=encoder,
            eval_inner_batch=batch,
            vectorize=vectorize,
            batch_norm="inductive",
            running_statistics=True,
        )
        self.adapt_body = adapt_body
        self.classifier = None if classifier is None else copy.deepcopy(classifier)
        self.epochs, self.batch = epochs, batch
        if batch is not None:  # the steps depend on the support set's size
            self.eval_inner_steps = None

    @property
    def body(self) -> nn.Module:
        if self.adapt_body:
            return cast(nn.Sequential, self.model)[0]  # Sequential(body, head)
        assert self.encoder is not None  # the body, which does not adapt
        return self.encoder

    @property
    def head(self) -> nn.Module:
        return cast(nn.Sequential, self.model)[1] if self.adapt_body else self.model

    # -- pretraining ------------------------------------------------------------------------

    def pretraining_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained network on a batch of examples: logits over every training class
        (or regression outputs)."""
        head = self.head if self.classifier is None else self.classifier
        return head(self.body(x))

    # These take a `Batch` of examples, not a `Task` (`training_data = "examples"`).
    def meta_loss(self, batch: Batch) -> torch.Tensor:  # type: ignore[override]
        return self.loss(self.pretraining_outputs(batch.x), batch.y)

    def training_step(self, batch: Batch) -> dict[str, float]:  # type: ignore[override]
        outputs = self.pretraining_outputs(batch.x)
        loss = self.loss(outputs, batch.y)
        if torch.isfinite(loss):
            loss.backward()
        metrics = {"loss": loss.item()}
        if not batch.y.is_floating_point():
            metrics["accuracy"] = (outputs.detach().argmax(-1) == batch.y).float().mean().item()
        return metrics

    # -- fine-tuning ------------------------------------------------------------------------

    def fine_tuning_steps(self, support_size: int) -> int:
        """Steps of `epochs` passes over a support set, each pass cut into mini-batches of
        `batch`, the last one smaller."""
        if self.batch is None or self.batch >= support_size:
            return self.epochs
        return self.epochs * steps_per_pass(support_size, self.batch)

    def evaluation_steps(self, support_size: int) -> int:
        if self.eval_inner_steps is None:
            return self.fine_tuning_steps(support_size)
        return self.eval_inner_steps

    @classmethod
    def training_loss_label(cls, inner_steps: int | None) -> str:
        return "loss"  # of the pretraining batches

    def adapt_tasks(self, support_x, support_y, inner_steps=None) -> Predictor:
        """Fine-tune on each support set, in eval mode for batch norm (running statistics);
        `inner_steps` overrides the number of steps that `epochs` makes."""
        steps = self.fine_tuning_steps(support_x.shape[1]) if inner_steps is None else inner_steps
        with batch_norm_mode(self, training=False):
            fitted = super().adapt_tasks(support_x, support_y, steps)
            return FineTunedPredictor(self, cast(GradientPredictor, fitted))


class FineTunedPredictor(Predictor):
    """A fine-tuned predictor: `params` holds each task's fitted parameters (a leading task
    dimension); batch norm normalises with the running statistics whatever the learner's mode."""

    def __init__(self, learner: TransferLearner, fitted: GradientPredictor) -> None:
        super().__init__(self._outputs)
        self.learner, self.fitted = learner, fitted

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.fitted.params

    def _outputs(self, query_x: torch.Tensor) -> torch.Tensor:
        with batch_norm_mode(self.learner, training=False):
            return self.fitted(query_x)


@dataclass
class TransferSettings(Settings):
    """Settings of the fine-tuning family; the run's `meta_batch` is the pretraining batch size
    (examples), its `outer_lr` the pretraining learning rate."""

    finetune_lr: float | None = setting("Fine-tuning step size.", fallback=0.01, learning_rate=True)
    finetune_momentum: float | None = setting("Fine-tuning momentum.", fallback=0.9)
    finetune_dampening: float | None = setting("Fine-tuning momentum dampening.", fallback=0.9)
    finetune_weight_decay: float | None = setting("Fine-tuning weight decay.", fallback=1e-3)
    finetune_epochs: int | None = setting("Passes over the support set.", fallback=100)
    finetune_batch: int | None = setting(
        "Support examples per fine-tuning step (0: the whole support set).", fallback=4
    )
    classes: int | None = setting(
        "Classes of the pretraining head.",
        default_text="the number of classes in the training data",
    )
    vectorize: bool | None = setting(
        "Fine-tune the episodes of an evaluation batch together under torch.func.vmap.",
        fallback=True,
    )

    def check(self, run) -> None:
        super().check(run)
        assert self.finetune_lr is not None and self.finetune_epochs is not None  # resolved
        assert self.finetune_batch is not None
        require_positive(finetune_lr=self.finetune_lr, finetune_epochs=self.finetune_epochs)
        if self.finetune_batch < 0:
            raise ConfigError(f"`finetune_batch` must be >= 0, got {self.finetune_batch}.")
        if self.batch_norm != "inductive":
            raise ConfigError(
                "the fine-tuning methods normalise with the running statistics of pretraining "
                "(inductive); transductive batch norm does not apply to them."
            )

    def fit_data(self, train) -> TransferSettings:
        if self.classes is None and hasattr(train, "num_classes"):
            return dataclasses.replace(self, classes=train.num_classes)
        return self

    def fine_tuning(self, problem: Problem) -> dict[str, Any]:
        """Keyword arguments of `TransferLearner` that come from these settings."""
        return dict(
            lr=self.finetune_lr,
            momentum=self.finetune_momentum,
            dampening=self.finetune_dampening,
            weight_decay=self.finetune_weight_decay,
            epochs=self.finetune_epochs,
            batch=self.finetune_batch or None,
            loss=problem.loss,
            vectorize=self.vectorize,
        )


def pretrained_parts(problem: Problem) -> tuple[nn.Module, nn.Module | None, int]:
    """The literature's network split for pretraining: (body, its last layer for regression
    or None, body output size)."""
    if problem.regression:
        body, head = body_and_head(problem.network())
        return body, head, cast(nn.Linear, head).in_features  # the regression MLP's last layer
    embedding = cast(FeaturesAndHead, problem.network(head=False, track_running_stats=True))
    return embedding, None, embedding.embedding_size


Learner = TypeVar("Learner", bound=TransferLearner)


def build_with_linear_heads(
    learner_class: type[Learner], settings: TransferSettings, problem: Problem
) -> Learner:
    """`learner_class(body, head, classifier)` on the literature's network: a linear
    `ways`-way head and a linear pretraining head over `settings.classes` (for regression, the
    network's last layer is both)."""
    body, last_layer, features = pretrained_parts(problem)
    options = settings.fine_tuning(problem)
    if problem.regression:
        assert last_layer is not None  # the regression network's, its head
        return learner_class(body, last_layer, None, **options)
    assert settings.classes is not None  # `fit_data`'s: the training data's classes
    head, classifier = nn.Linear(features, problem.ways), nn.Linear(features, settings.classes)
    return learner_class(body, head, classifier, **options)


# Chen et al. 2019 (their released code): Omniglot pretraining with Adam 1e-3 in batches of 16
# for 5 epochs; fine-tuning per episode with SGD 0.01, momentum 0.9, dampening 0.9, weight
# decay 0.001, batches of 4, 100 epochs. Finn et al. 2017 (sec. 5.1) compare MAML on sinusoids
# with "a model pretrained on all of the tasks" and fine-tuned by gradient descent.
OMNIGLOT_PRETRAINING = dict(
    shots=1,
    queries=15,
    meta_batch=16,
    outer_lr=1e-3,
    iterations=27500,  # 5 epochs of the vinyals training part: 88,000 images / 16
    val_every=2750,
)
SINUSOID_PRETRAINING = dict(
    shots=10,
    queries=10,
    meta_batch=250,
    outer_lr=1e-3,
    iterations=8000,
    val_every=1000,
    finetune_lr=0.01,
    finetune_momentum=0.0,
    finetune_dampening=0.0,
    finetune_weight_decay=0.0,
    finetune_batch=0,
    finetune_epochs=10,
)
