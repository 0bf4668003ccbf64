"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, 2017).

For a meta-batch of tasks i with support and query sets, MAML minimises over the initial
parameters theta

    sum_i L_query_i(phi_i),   phi_i = theta - alpha * grad_theta L_support_i(theta)

(with several inner steps, the update is repeated from phi_i). The meta-gradient flows through
the inner updates, Hessian-vector products included; `first_order=True` treats the inner
gradients as constants (FOMAML).
"""

from __future__ import annotations

import contextvars
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from fewshot.algorithms.base import Algorithm
from fewshot.errors import ConfigError, require_positive
from fewshot.tasks import Task

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MAML(Algorithm):
    """MAML around any `nn.Module`, called functionally through `torch.func.functional_call`.

    Args:
        model: the network; its parameters are the meta-learned initialisation theta. Batch norm
            uses each task's own batch statistics, as in MAML: its layers are changed in place
            to keep no running statistics (see `use_task_batch_norm`).
        inner_lr: alpha, the step size of the inner (adaptation) updates.
        inner_steps: inner updates per task during meta-training.
        eval_inner_steps: inner updates when predicting; defaults to `inner_steps`.
        first_order: drop the second-order term (FOMAML).
        loss: loss(outputs, targets) with mean reduction; cross-entropy by default.
        vectorize: adapt all tasks of a meta-batch at once with `torch.func.vmap`; otherwise one
            task at a time. Both compute the same numbers.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        loss: LossFn = F.cross_entropy,
        vectorize: bool = True,
    ) -> None:
        super().__init__()
        require_positive(inner_lr=inner_lr, inner_steps=inner_steps)
        if eval_inner_steps is not None and eval_inner_steps < 0:
            raise ConfigError(f"eval_inner_steps must be >= 0, got {eval_inner_steps}.")
        self.model = use_task_batch_norm(model)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.loss = loss
        self.vectorize = vectorize

    def adapt(self, task: Task, inner_steps: int | None = None) -> Params:
        """Parameters adapted to one task's support set, for `functional_call(model, params, x)`."""
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        return self._adapt(self._params(), task.support_x, task.support_y, steps)

    def meta_loss(self, tasks: Task) -> torch.Tensor:
        return self._map_tasks(self._task_loss, tasks.tensors()).mean()

    def backward_meta_loss(self, tasks: Task) -> torch.Tensor:
        """Per-task path: back-propagate each task's share of the loss as soon as it is computed,
        so only one task's graph is alive at a time (the same gradient, a fraction of the memory).
        """
        if self.vectorize:
            return super().backward_meta_loss(tasks)
        params, buffers = self._params(), dict(self.model.named_buffers())
        total = torch.zeros(())
        for task in zip(*tasks.tensors()):
            loss = self._task_loss(params, buffers, *task) / len(tasks)
            if torch.isfinite(loss):
                loss.backward()
            total = total + loss.detach().cpu()
        return total

    def _task_loss(self, params, buffers, support_x, support_y, query_x, query_y):
        adapted = self._adapt(params, support_x, support_y, self.inner_steps, buffers)
        return self.loss(self._forward(adapted, buffers, query_x), query_y)

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        steps = self.eval_inner_steps if inner_steps is None else inner_steps

        def task_predict(params, buffers, support_x, support_y, query_x):
            adapted = self._adapt(params, support_x, support_y, steps, buffers)
            return self._forward(adapted, buffers, query_x)

        with torch.no_grad():  # torch.func.grad still differentiates the inner loop
            return self._map_tasks(task_predict, tasks.tensors()[:3])

    def _map_tasks(self, fn: Callable, per_task: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """fn(params, buffers, *task_tensors) for every task, stacked along a new first dim."""
        params, buffers = self._params(), dict(self.model.named_buffers())
        if self.vectorize:
            in_dims = (None, None) + (0,) * len(per_task)
            token = _UNDER_VMAP.set(True)
            try:
                return vmap(fn, in_dims=in_dims, randomness="different")(params, buffers, *per_task)
            finally:
                _UNDER_VMAP.reset(token)
        return torch.stack([fn(params, buffers, *tensors) for tensors in zip(*per_task)])

    def _adapt(
        self,
        params: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        buffers: Params | None = None,
    ) -> Params:
        """theta_{s+1} = theta_s - alpha * grad L_support(theta_s), `steps` times."""
        buffers = dict(self.model.named_buffers()) if buffers is None else buffers

        def support_loss(p: Params) -> torch.Tensor:
            return self.loss(self._forward(p, buffers, x), y)

        for _ in range(steps):
            grads = grad(support_loss)(params)
            if self.first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            params = {name: p - self.inner_lr * grads[name] for name, p in params.items()}
        return params

    def _forward(self, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (params, buffers), (x,))

    def _params(self) -> Params:
        return dict(self.model.named_parameters())


# Set while MAML runs its tasks under vmap, where batch norm must take the composite path.
_UNDER_VMAP: contextvars.ContextVar[bool] = contextvars.ContextVar("under_vmap", default=False)


def use_task_batch_norm(model: nn.Module) -> nn.Module:
    """Make every batch-norm layer of `model` normalise with the current batch's statistics only.

    Running statistics are dropped, as MAML prescribes. Under `vmap` the layers compute batch
    norm from elementary ops rather than the fused kernel, whose double backward gives wrong
    second-order gradients there in torch 2.13 (off by ~1e-2 against float64 finite differences,
    see tests/algorithms/test_maml.py); one task at a time they use the fused kernel, which is
    exact there and faster.
    """
    replace_all_batch_norm_modules_(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = types.MethodType(_task_batch_norm, module)
    return model


def _task_batch_norm(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not _UNDER_VMAP.get():
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=False)
    y = (x - mean) * torch.rsqrt(var + self.eps)
    if self.affine:
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = y * self.weight.view(shape) + self.bias.view(shape)
    return y
