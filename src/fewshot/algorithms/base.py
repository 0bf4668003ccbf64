"""The interface every meta-learning method shares: one training loop and evaluator serve all."""

from __future__ import annotations

import torch
from torch import nn

from fewshot.tasks import Task


class Algorithm(nn.Module):
    """A meta-learning method wrapping a model.

    Subclasses implement two methods on meta-batches (a `Task` whose tensors have a leading task
    dimension): `meta_loss` for training and `predict` for evaluation. Everything learnable is a
    parameter or buffer of the algorithm, so `parameters()` and `state_dict()` cover it.
    """

    def meta_loss(self, tasks: Task) -> torch.Tensor:
        """Mean query loss over the meta-batch, differentiable with respect to `parameters()`."""
        raise NotImplementedError

    def backward_meta_loss(self, tasks: Task) -> torch.Tensor:
        """Accumulate grad of `meta_loss(tasks)` into `.grad` and return the (detached) loss.

        Methods may override this to save memory, e.g. by back-propagating task by task.
        """
        loss = self.meta_loss(tasks)
        if torch.isfinite(loss):
            loss.backward()
        return loss.detach()

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        """Query outputs (logits or regression values), shaped (tasks, queries, ...).

        `inner_steps` overrides the number of adaptation steps for methods that adapt by
        gradient descent; methods without an inner loop ignore it.
        """
        raise NotImplementedError
