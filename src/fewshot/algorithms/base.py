"""The interface every meta-learning method shares: one training loop and evaluator serve all.

A method is trained on meta-batches (a `Task` whose tensors have a leading task dimension) with
`training_step`, and used with `adapt(support_x, support_y) -> Predictor`: the predictor labels
new inputs of those tasks, without their labels. `predict(tasks)` is `adapt` followed by the
predictor on the query inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.errors import ConfigError
from fewshot.tasks import Task

# Which examples a batch-norm layer takes its statistics from when a trained method predicts:
# "transductive": the batch at hand, so the queries of an episode influence each other's
#     predictions (MAML's original protocol);
# "inductive": never from other queries (the support set, or running statistics).
BATCH_NORM_POLICIES = ("transductive", "inductive")


class Predictor:
    """Outputs for new inputs of the tasks a method was adapted to.

    Called on inputs shaped (tasks, n, ...), with the same leading task dimension as the support
    sets it was adapted on, it returns (tasks, n, outputs): logits for classification, values
    for regression.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._forward = forward

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._forward(inputs)

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities, softmax of the logits."""
        return F.softmax(self(inputs), dim=-1)


class Algorithm(nn.Module):
    """A meta-learning method wrapping a model.

    Subclasses implement `meta_loss` (or `training_step`, when the outer update is not the
    gradient of a loss) and `adapt`. Everything learnable is a parameter or buffer of the
    algorithm, so `parameters()` and `state_dict()` cover it. `batch_norm` is one of
    `BATCH_NORM_POLICIES`.
    """

    batch_norm: str = "transductive"
    # What `training_step` takes: "episodes" (a `Task` meta-batch, from a `TaskSampler`) or
    # "examples" (a `Batch` of examples of all training classes, from an `ExampleSampler`),
    # for methods that pretrain without episodes.
    training_data: str = "episodes"

    @property
    def is_transductive(self) -> bool:
        """Whether a query's prediction can depend on the other queries of its episode."""
        return self.batch_norm == "transductive"

    def meta_loss(self, tasks: Task) -> torch.Tensor:
        """Mean query loss over the meta-batch, differentiable with respect to `parameters()`."""
        raise NotImplementedError

    def training_step(self, tasks: Task) -> dict[str, float]:
        """Accumulate the outer gradient of one meta-batch (or `Batch` of examples, for
        `training_data = "examples"`) into `.grad`; return its metrics.

        The metrics hold at least "loss"; methods add what they get cheaply ("accuracy" of the
        queries, "inner_loss" of the support sets). A non-finite loss is returned without
        back-propagating it, and the training loop stops on it.
        """
        loss = self.meta_loss(tasks)
        if torch.isfinite(loss):
            loss.backward()
        return {"loss": loss.item()}

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, inner_steps: int | None = None
    ) -> Predictor:
        """Adapt to support sets shaped (tasks, n, ...), and return their predictor.

        `inner_steps` overrides the number of adaptation steps of gradient-based methods;
        other methods ignore it. For one task, add a leading dimension of 1.
        """
        raise NotImplementedError

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        """Query outputs (logits or regression values), shaped (tasks, queries, ...)."""
        with torch.no_grad():
            return self.adapt(tasks.support_x, tasks.support_y, inner_steps)(tasks.query_x)

    def configure_optimizers(
        self, lr: float, iterations: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The outer optimizer and its learning-rate schedule (None: constant); Adam by default.

        The training loop steps the schedule once per iteration and checkpoints its state.
        """
        return torch.optim.Adam(self.parameters(), lr=lr), None


def check_batch_norm_policy(policy: str) -> str:
    if policy not in BATCH_NORM_POLICIES:
        raise ConfigError(
            f"batch_norm must be one of {', '.join(BATCH_NORM_POLICIES)}, got {policy!r}."
        )
    return policy


BATCH_NORM_LAYERS = nn.modules.batchnorm._BatchNorm


def has_batch_norm(module: nn.Module) -> bool:
    """Whether `module` has batch-norm layers: torch's, or layers that mark themselves with
    `is_batch_norm = True` (`batchnorm.PerStepBatchNorm`)."""
    return any(
        isinstance(m, BATCH_NORM_LAYERS) or getattr(m, "is_batch_norm", False)
        for m in module.modules()
    )


@contextlib.contextmanager
def batch_norm_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Put the module's batch-norm layers, and nothing else, in training mode (batch
    statistics) or eval mode (running statistics) for the duration."""
    layers = [m for m in module.modules() if isinstance(m, BATCH_NORM_LAYERS)]
    modes = [m.training for m in layers]
    for m in layers:
        m.train(training)
    try:
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


@contextlib.contextmanager
def unchanged_buffers(module: nn.Module) -> Iterator[None]:
    """Forward passes within may update buffers (batch norm's running statistics, in training
    mode); their values before the block are put back after it."""
    saved = {name: b.clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])
