"""Running the tasks of a meta-batch in parallel: vectorised with `torch.func.vmap`, one task
at a time, or in chunks of tasks, each task with its own parameters and, where the forward
pass updates buffers, its own copy of them.

Every function here takes what it needs as arguments; the one piece of context, the tasks'
own buffers (`per_task_buffers`), is a context variable that a `with` block sets, so that it
reaches the forward passes of the inner loop and of prediction without a learner attribute
that lives on between calls.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import cast

import torch
from torch import nn
from torch.func import functional_call, vmap

from fewshot.algorithms.gradient import grouped
from fewshot.algorithms.gradient.inner_loop import context_value
from fewshot.algorithms.rules import Params

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CPU_IMAGES_PER_PASS = 40  # support + query images one vectorised pass takes on a CPU

_TASK_BUFFERS: ContextVar[Params | None] = ContextVar("fewshot_task_buffers", default=None)


def default_chunk_size(
    images: bool, meta_batch: int, examples_per_task: int, device: str = "cpu"
) -> int:
    """Tasks per vectorised pass of a gradient-based method when the user does not say.

    The whole meta-batch for small vector inputs (sinusoid, tables) and on a GPU (fastest
    there). For images on a CPU, as many tasks as fit in `CPU_IMAGES_PER_PASS` support and
    query images: vectorising pays off where tasks are small, much less where they are large
    (docs/performance.md).
    """
    if not images or not str(device).startswith("cpu"):
        return meta_batch
    return max(1, min(meta_batch, CPU_IMAGES_PER_PASS // examples_per_task))


def chunk_slices(tasks: int, size: int) -> list[slice]:
    """The positions of a meta-batch of `tasks` tasks in passes of `size` tasks."""
    return [slice(start, start + size) for start in range(0, tasks, size)]


def per_task_buffers(buffers: Params | None) -> contextlib.AbstractContextManager[None]:
    """Within, the model's forward passes read and write task i's slice of `buffers` (a
    leading task dimension) in place of the model's own buffers: each task's own copy of
    buffers that the forward pass updates, such as running statistics, which vmap cannot
    write across tasks."""
    return context_value(_TASK_BUFFERS, buffers)


def current_task_buffers() -> Params | None:
    """The buffers of the tasks now running (`per_task_buffers`), or None: the model's own."""
    return _TASK_BUFFERS.get()


@contextlib.contextmanager
def chunk_of_task_buffers(chunk: slice) -> Iterator[None]:
    """Within, the tasks' own buffers are those of the tasks in `chunk` (views, so the forward
    passes still update the meta-batch's copies); nothing changes without per-task buffers."""
    buffers = current_task_buffers()
    if buffers is None:
        yield
        return
    with per_task_buffers({n: b[chunk] for n, b in buffers.items()}):
        yield


def vmapped(x: torch.Tensor | tuple, vectorize: bool) -> bool:
    """Whether the tasks of inputs `x` run under vmap."""
    # A single task runs faster as a plain call (Conv4 on CPU; docs/performance.md).
    return vectorize and tasks_of(x) > 1


def per_task_loss(
    loss: LossFn, outputs: torch.Tensor, targets: torch.Tensor, vectorize: bool
) -> torch.Tensor:
    """Each task's loss, shape (tasks,)."""
    if vmapped(outputs, vectorize):
        return vmap(loss)(outputs, targets)
    return torch.stack([loss(out, target) for out, target in zip(outputs, targets)])


def on_every_task(
    module: nn.Module,
    params: Params,
    x: torch.Tensor | tuple,
    params_per_task: bool,
    task_buffers: Params | None = None,
    stage: int | None = None,
    *,
    vectorize: bool,
) -> torch.Tensor | tuple:
    """`module` called on each task's inputs x[i], vectorised over tasks or one by one, with
    task i's slice of `params` (`params_per_task`) or the same `params` for all, and the
    module's buffers, or task i's slice of `task_buffers` (each task's own copy, for buffers
    the forward pass updates in place, such as running statistics). With `stage`,
    `module(x, stage=stage)` (`models.checkpoint_segments`), whose x and result may be tuples
    of tensors with a leading task dimension."""
    if vmapped(x, vectorize) and grouped_call(
        module, params, x, params_per_task, task_buffers, stage
    ):
        return grouped.on_every_task(module, params, cast(torch.Tensor, x))
    buffers = dict(module.named_buffers()) if task_buffers is None else task_buffers
    call = _call if stage is None else functools.partial(_call, stage=stage)
    if vmapped(x, vectorize):
        dims = (None, 0 if params_per_task else None, None if task_buffers is None else 0, 0)
        return vmap(call, in_dims=dims, randomness="different")(module, params, buffers, x)
    outputs = [
        call(
            module,
            _task_slice(params, params_per_task, i),
            _task_slice(buffers, task_buffers is not None, i),
            task_of(x, i),
        )
        for i in range(tasks_of(x))
    ]
    return _stacked(outputs)


def grouped_call(
    module: nn.Module,
    params: Params,
    x: torch.Tensor | tuple,
    params_per_task: bool,
    task_buffers: Params | None,
    stage: int | None,
) -> bool:
    """Whether the vectorised call runs with tasks as groups (`grouped`) rather than under
    vmap: each task with its own values of every parameter (a tied one under each of its
    names) and the module's buffers, the whole module, and a network that
    `grouped.runs_grouped`."""
    whole = params_per_task and task_buffers is None and stage is None
    names = (name for name, _ in module.named_parameters(remove_duplicate=False))
    return whole and all(name in params for name in names) and grouped.runs_grouped(module, x)


def tasks_of(x: torch.Tensor | tuple) -> int:
    """The number of tasks of inputs `x` (a tensor or a tuple of tensors): the first dim."""
    return len(x[0] if isinstance(x, tuple) else x)


def task_of(x: torch.Tensor | tuple, i: int) -> torch.Tensor | tuple:
    """Task i's slice of inputs `x`, a tensor or a tuple of tensors."""
    return tuple(t[i] for t in x) if isinstance(x, tuple) else x[i]


def _call(
    module: nn.Module, params: Params, buffers: Params, x: torch.Tensor | tuple, **kwargs: object
) -> torch.Tensor | tuple:
    return functional_call(module, (params, buffers), (x,), kwargs)


def _task_slice(values: Params, per_task: bool, i: int) -> Params:
    """Task i's entries of `values` where they have a task dimension, else `values`."""
    return {n: v[i] for n, v in values.items()} if per_task else values


def _stacked(outputs: list) -> torch.Tensor | tuple:
    """Per-task outputs (tensors or tuples of tensors) stacked along a new task dim; one task's
    as a view, since a copy of each activation would cost memory and time."""
    if isinstance(outputs[0], tuple):
        return tuple(_stacked(list(parts)) for parts in zip(*outputs))
    if len(outputs) == 1:
        return outputs[0].unsqueeze(0)
    return torch.stack(outputs)
