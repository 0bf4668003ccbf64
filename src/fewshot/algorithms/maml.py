"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, 2017).

For a meta-batch of tasks i with support and query sets, MAML minimises over the initial
parameters theta

    sum_i L_query_i(phi_i),   phi_i = theta - alpha * grad_theta L_support_i(theta)

(with several inner steps, the update is repeated from phi_i). The meta-gradient flows through
the inner updates, Hessian-vector products included; `first_order=True` treats the inner
gradients as constants (FOMAML).

How the tasks are run: theta is expanded into one copy per task, the model is called on all
tasks at once through `torch.func.vmap` (one batched, grouped computation instead of a Python
loop), and plain `torch.autograd.grad` of the summed support losses gives every task its own
inner gradient, because the tasks are independent: d(sum_j L_j)/d(phi_i) = dL_i/d(phi_i). Only
the forward pass is vmapped; every backward pass, the second-order one included, is ordinary
autograd on ordinary tensors, so torch's fused kernels (batch norm's among them) stay exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

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
        vectorize: run the tasks of a meta-batch together under `torch.func.vmap`; otherwise one
            task at a time with plain calls (for models that vmap cannot trace). Both compute
            the same numbers (up to dropout's random draws, which differ between the two).
        chunk_size: with `vectorize`, how many tasks one vectorised pass takes when training
            (`backward_meta_loss`); each pass is back-propagated before the next starts, so
            peak memory grows with `chunk_size`, not with the meta-batch. None: all at once.

    Parameters with `requires_grad=False` stay fixed: neither adapted nor meta-learned.
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
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        require_positive(inner_lr=inner_lr, inner_steps=inner_steps)
        if chunk_size is not None:
            require_positive(chunk_size=chunk_size)
        if eval_inner_steps is not None and eval_inner_steps < 0:
            raise ConfigError(f"eval_inner_steps must be >= 0, got {eval_inner_steps}.")
        self.model = use_task_batch_norm(model)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.loss = loss
        self.vectorize = vectorize
        self.chunk_size = chunk_size

    def adapt(self, task: Task, inner_steps: int | None = None) -> Params:
        """Parameters adapted to one task's support set, for `functional_call(model, params, x)`.

        Differentiable with respect to theta (second order unless `first_order`) when called
        with gradients enabled.
        """
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        adapted = self._adapt(task.support_x.unsqueeze(0), task.support_y.unsqueeze(0), steps)
        return {name: p[0] for name, p in adapted.items()}

    def meta_loss(self, tasks: Task) -> torch.Tensor:
        return self._query_losses(tasks).mean()

    def backward_meta_loss(self, tasks: Task) -> torch.Tensor:
        """Back-propagate the meta-loss `chunk_size` tasks at a time (one task at a time without
        `vectorize`), so that only one chunk's graph is alive: the same gradient as
        `meta_loss(tasks).backward()`, in a fraction of the memory.
        """
        size = (self.chunk_size or len(tasks)) if self.vectorize else 1
        total = torch.zeros((), device=tasks.support_x.device)
        for start in range(0, len(tasks), size):
            loss = self._query_losses(tasks[start : start + size]).sum() / len(tasks)
            if torch.isfinite(loss):
                loss.backward()
            total = total + loss.detach()
        return total

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        with torch.no_grad():
            adapted = self._adapt(tasks.support_x, tasks.support_y, steps)
            return self._outputs(adapted, tasks.query_x)

    def _query_losses(self, tasks: Task) -> torch.Tensor:
        """Each task's query loss after adaptation, shape (tasks,)."""
        adapted = self._adapt(tasks.support_x, tasks.support_y, self.inner_steps)
        return self._losses(adapted, tasks.query_x, tasks.query_y)

    def _adapt(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
        """phi_{s+1} = phi_s - alpha * grad L_support(phi_s) for every task of (x, y) at once,
        from phi_0 = theta; the result has a leading task dimension.

        The inner gradients always run, even under `torch.no_grad()`; the adapted parameters
        are differentiable with respect to theta only where gradients are enabled, through the
        inner gradients too unless `first_order`.
        """
        differentiable = torch.is_grad_enabled()
        create_graph = differentiable and not self.first_order
        params = dict(self.model.named_parameters())
        learnable = [name for name, p in params.items() if p.requires_grad]
        with torch.enable_grad():
            adapted = {name: p.expand(len(x), *p.shape) for name, p in params.items()}
            for _ in range(steps if learnable else 0):
                # Summed over tasks: each task's copy receives exactly its own task's gradient.
                grads = torch.autograd.grad(
                    self._losses(adapted, x, y).sum(),
                    [adapted[name] for name in learnable],
                    create_graph=create_graph,
                    allow_unused=True,
                )
                for name, g in zip(learnable, grads):
                    if g is not None:  # a parameter the model did not use stays as it is
                        adapted[name] = adapted[name] - self.inner_lr * g
        if not differentiable:
            adapted = {name: p.detach() for name, p in adapted.items()}
        return adapted

    def _losses(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each task's loss of `params` (leading task dim) on (x, y), shape (tasks,)."""
        outputs = self._outputs(params, x)
        if self._vmapped(x):
            return vmap(self.loss)(outputs, y)
        return torch.stack([self.loss(out, target) for out, target in zip(outputs, y)])

    def _outputs(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The model's outputs for every task, with task i's inputs x[i] and parameters
        params[name][i], stacked along a leading task dimension."""
        buffers = dict(self.model.named_buffers())
        if self._vmapped(x):
            batched = vmap(self._forward, in_dims=(0, None, 0), randomness="different")
            return batched(params, buffers, x)
        return torch.stack(
            [
                self._forward({name: p[i] for name, p in params.items()}, buffers, x[i])
                for i in range(len(x))
            ]
        )

    def _vmapped(self, x: torch.Tensor) -> bool:
        # A single task runs faster as a plain call (Conv4 on CPU, chunks of one task: 1.41 s
        # a meta-batch against 1.68 s under vmap; docs/performance.md); same numbers.
        return self.vectorize and len(x) > 1

    def _forward(self, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (params, buffers), (x,))


def use_task_batch_norm(model: nn.Module) -> nn.Module:
    """Make every batch-norm layer of `model` normalise with the current batch's statistics only.

    Running statistics are dropped, as MAML prescribes; under `vmap` the batch is one task's,
    so each task is normalised with its own statistics.
    """
    replace_all_batch_norm_modules_(model)
    return model
