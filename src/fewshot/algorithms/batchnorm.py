"""Batch norm with running statistics that a gradient-based method keeps per task and per step.

`PerStepBatchNorm` holds one row of affine parameters (optional) and of running statistics per
inner step and uses the row of `current_inner_step()`. What it normalises with depends on the
context a method runs it in:

- inside `tracking_statistics()`: the batch's statistics, and the running statistics of the
  current step move towards them (MAML++'s meta-training; Meta-LSTM's adaptation, which keeps
  running averages of the support set to normalise its queries with);
- inside `batch_statistics()`: the batch's statistics;
- otherwise: the running statistics if the layer's `use_running_statistics`, else the batch's.

Under `torch.func.vmap` a buffer cannot be written across tasks, so a method that tracks
statistics gives every task its own copy of the buffers (`GradientLearner.per_task_buffers`).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import BATCH_NORM_LAYERS
from fewshot.algorithms.gradient import context_value, current_inner_step

_MODE: ContextVar[str | None] = ContextVar("fewshot_batch_norm_statistics", default=None)


def tracking_statistics():
    """Normalise with batch statistics and update the running statistics from them."""
    return context_value(_MODE, "track")


def batch_statistics():
    """Normalise with batch statistics, whatever the layers' `use_running_statistics`."""
    return context_value(_MODE, "batch")


class PerStepBatchNorm(nn.Module):
    """Batch norm with a row of weights and biases (`per_step_weights`) and of running
    statistics (`running_statistics`) per inner step; step s uses row s (the last row for steps
    past `steps`).

    Tracking updates step s's statistics r_s with a batch statistic b as
    r_s <- (1 - momentum) r_s + momentum b, or with `momentum=None` as the plain average of
    every batch seen (a cumulative average, counted per step in `batches_tracked`). The
    variance is the unbiased one, as in `nn.BatchNorm`.
    """

    is_batch_norm = True  # for `base.has_batch_norm`: its output depends on the batch
    # Buffers: None without `running_statistics` (and the count without `momentum=None`).
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    batches_tracked: torch.Tensor | None

    def __init__(
        self,
        num_features: int,
        steps: int = 1,
        per_step_weights: bool = True,
        running_statistics: bool = True,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        self.num_features, self.steps, self.eps, self.momentum = num_features, steps, eps, momentum
        self.per_step_weights = per_step_weights
        shape = (steps, num_features) if per_step_weights else (num_features,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.use_running_statistics = False
        tracked = running_statistics
        self.register_buffer("running_mean", torch.zeros(steps, num_features) if tracked else None)
        self.register_buffer("running_var", torch.ones(steps, num_features) if tracked else None)
        counted = tracked and momentum is None
        self.register_buffer("batches_tracked", torch.zeros(steps) if counted else None)

    @classmethod
    def replacing(
        cls, layer: nn.modules.batchnorm._BatchNorm, steps: int = 1, **options: Any
    ) -> PerStepBatchNorm:
        """A per-step layer that starts every step from `layer`'s weights and biases."""
        new = cls(layer.num_features, steps, eps=layer.eps, **options)
        for mine, theirs in ((new.weight, layer.weight), (new.bias, layer.bias)):
            if layer.affine:
                with torch.no_grad():
                    mine.copy_(theirs.expand_as(mine))
                mine.requires_grad_(theirs.requires_grad)  # a frozen layer stays frozen
            else:  # no affine transform: the identity weights and zero biases stay fixed
                mine.requires_grad_(False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = min(current_inner_step(), self.steps - 1)
        weight = self.weight[step] if self.per_step_weights else self.weight
        bias = self.bias[step] if self.per_step_weights else self.bias
        mode = _MODE.get()
        if self.running_mean is not None:
            assert self.running_var is not None  # registered with the running mean
            if mode == "track" and self.momentum is not None:
                # The fused kernel normalises and updates the running rows in one pass over x,
                # where a separate mean and variance (`_track`) cost two more (docs/parity.md).
                mean, var = self.running_mean[step], self.running_var[step]
                return F.batch_norm(x, mean, var, weight, bias, True, self.momentum, self.eps)
            if mode == "track":
                self._track(x.detach(), step)
            elif mode is None and self.use_running_statistics:
                mean, var = self.running_mean[step], self.running_var[step]
                return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)

    def _track(self, x: torch.Tensor, step: int) -> None:
        """The cumulative average (`momentum=None`), whose factor 1 / count is a tensor the
        fused kernel does not take."""
        dims = [0, *range(2, x.dim())]
        # Tracked with `momentum=None`: every running buffer is there.
        assert self.batches_tracked is not None
        assert self.running_mean is not None and self.running_var is not None
        self.batches_tracked[step].add_(1)
        factor = 1 / self.batches_tracked[step]
        for running, batch in (
            (self.running_mean[step], x.mean(dims)),
            (self.running_var[step], x.var(dims, correction=1)),
        ):
            running.mul_(1 - factor).add_(factor * batch)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, steps={self.steps}, per_step_weights={self.per_step_weights}, "
            f"running_statistics={self.running_mean is not None}, momentum={self.momentum}"
        )


def per_step_batch_norm_(model: nn.Module, steps: int = 1, **options: Any) -> list[str]:
    """Replace every batch-norm layer of `model` by a `PerStepBatchNorm` (in place); return the
    names of the new layers' weights and biases."""
    names = []
    for prefix, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BATCH_NORM_LAYERS):
                setattr(module, child_name, PerStepBatchNorm.replacing(child, steps, **options))
                path = f"{prefix}.{child_name}" if prefix else child_name
                names += [f"{path}.weight", f"{path}.bias"]
    return names


def running_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running-statistics buffers of `model`'s `PerStepBatchNorm` layers, by buffer name."""
    return {
        f"{prefix}.{name}" if prefix else name: buffer
        for prefix, layer in model.named_modules()
        if isinstance(layer, PerStepBatchNorm) and layer.running_mean is not None
        for name, buffer in layer.named_buffers(recurse=False)
    }


def per_task_copies(buffers: dict[str, torch.Tensor], tasks: int) -> dict[str, torch.Tensor]:
    """One copy of every buffer per task (leading task dimension)."""
    return {n: b.expand(tasks, *b.shape).clone() for n, b in buffers.items()}
