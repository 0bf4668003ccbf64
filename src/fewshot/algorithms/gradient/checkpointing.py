"""Activation checkpointing in meta-training (`GradientLearner(checkpoint_inner=True)`): the
same meta-gradient for less memory, at the cost of computing forward passes again.

Each second-order inner step keeps only its inputs and is computed again, with its graph, in
the backward pass (`RecomputedStep`, `recomputed_update`); the query pass (and the encoder's)
keeps only the inputs of its segments (`models.checkpoint_segments`), recomputed one at a
time, but for the trailing segments that save no more, together, than the largest
(`plain_tail`, `in_segments`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten
from torch.utils.checkpoint import checkpoint, get_device_states, set_device_states

from fewshot.algorithms.gradient.inner_loop import Update
from fewshot.algorithms.gradient.parallel import tasks_of
from fewshot.algorithms.rules import Params
from fewshot.models import checkpoint_segments

# `parallel.on_every_task` with the learner's way of running tasks:
# (module, params, x, params_per_task, task_buffers, stage) -> outputs.
RunSegment = Callable[..., torch.Tensor | tuple]
# One segment's arguments but the inputs: (part, params, params_per_task, task buffers, stage).
Segment = tuple[nn.Module, Params | None, bool, Params | None, int | None]


class RecomputedStep(torch.autograd.Function):
    """A second-order inner step that keeps only its inputs, for `checkpoint_inner`.

    Forward: phi_{s+1} from phi_s with a first-order inner gradient and no graph kept.
    Backward: the step again from the kept inputs, now recording its graph (`create_graph`:
    the inner gradient's own graph), and the vector-Jacobian product through it. Unlike
    `torch.utils.checkpoint` around the step, the forward pass does not discard the
    activations its own inner gradient needs at once (which would recompute them there too).
    `run(values, create_graph)` computes the step's output tensors from its input tensors; the
    `parameters` after the first `inputs` are the learner's, which `run` may read directly
    (the rule's step sizes): their gradients are returned too.
    """

    @staticmethod
    def forward(ctx, run, inputs: int, *tensors: torch.Tensor):
        ctx.run = run
        ctx.parameters = tensors[inputs:]
        ctx.save_for_backward(*tensors[:inputs])
        ctx.cpu_rng = torch.get_rng_state()
        ctx.devices, ctx.device_rngs = get_device_states(*tensors)
        with torch.enable_grad():
            outputs = run(_fresh_leaves(tensors[:inputs]), False)
        return tuple(t.detach() for t in outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *output_grads):
        inputs = _fresh_leaves(ctx.saved_tensors)
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            set_device_states(ctx.devices, ctx.device_rngs)
            outputs = ctx.run(inputs, True)
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, output_grads, strict=True)
            if grad is not None and out.requires_grad
        ]
        wanted = [t for t in (*inputs, *ctx.parameters) if t.requires_grad]
        grads = iter(
            torch.autograd.grad(
                [out for out, _ in pairs], wanted, [grad for _, grad in pairs], allow_unused=True
            )
            if pairs
            else [None] * len(wanted)
        )
        return (
            None,
            None,
            *(next(grads) if t.requires_grad else None for t in (*inputs, *ctx.parameters)),
        )


def recomputed_update(
    update: Update,
    adapted: list[str],
    learned: Sequence[torch.Tensor],
    params: Params,
    state: object,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[Params, object, torch.Tensor]:
    """The second-order inner step `update`, keeping only its inputs (`RecomputedStep`): its
    forward pass and its inner gradient are computed again, with their graph, when the
    meta-gradient reaches this step. `adapted` names the parameters the step changes;
    `learned` are the learner's parameters that `update` reads directly."""
    inputs, spec = tree_flatten((params, state, x, y))
    tensors = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
    # How `run` flattened its results, which the forward pass's outputs are put back into.
    results: dict[str, Any] = {}

    def run(values: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
        leaves = list(inputs)
        for i, value in zip(tensors, values, strict=True):
            leaves[i] = value
        step_params, step_state, step_x, step_y = tree_unflatten(leaves, spec)
        p, s, losses = update(step_params, step_state, step_x, step_y, create_graph)
        flat, results["spec"] = tree_flatten(({n: p[n] for n in adapted}, s, losses))
        results["flat"] = flat
        return [v for v in flat if isinstance(v, torch.Tensor)]

    outputs = iter(RecomputedStep.apply(run, len(tensors), *(inputs[i] for i in tensors), *learned))
    flat = [next(outputs) if isinstance(v, torch.Tensor) else v for v in results["flat"]]
    updated, state, losses = tree_unflatten(flat, results["spec"])
    return {**params, **updated}, state, losses


def in_segments(
    run_segment: RunSegment,
    module: nn.Module,
    params: Params,
    x: torch.Tensor | tuple,
    params_per_task: bool,
    task_buffers: Params | None,
) -> torch.Tensor:
    """`run_segment` on one segment of `module` at a time (`models.checkpoint_segments`), each
    under activation checkpointing but the last few (`plain_tail`): the backward pass keeps
    only the checkpointed segments' inputs and recomputes one segment's activations at a
    time."""
    segments = segments_of(module, params, params_per_task, task_buffers)
    plain = plain_tail(saved_bytes(run_segment, segments, x))
    for k, (part, part_params, per_task, buffers, stage) in enumerate(segments):
        args = (part, part_params, x, per_task, buffers, stage)
        if k >= len(segments) - plain:
            x = run_segment(*args)
        else:
            x = checkpoint(run_segment, *args, use_reentrant=False)
    return cast(torch.Tensor, x)  # the last segment's outputs: the module's


def segments_of(
    module: nn.Module, params: Params, params_per_task: bool, task_buffers: Params | None
) -> list[Segment]:
    """`run_segment`'s arguments but the inputs, for each of `module`'s checkpoint segments:
    (part, its params, params_per_task, its task buffers, stage)."""
    return [
        (part, _within(params, prefix), params_per_task, _within(task_buffers, prefix), stage)
        for prefix, part, stage in checkpoint_segments(module)
    ]


def saved_bytes(
    run_segment: RunSegment, segments: list[Segment], x: torch.Tensor | tuple
) -> list[int] | None:
    """The bytes each segment saves for the backward pass on inputs shaped as `x`, measured
    on the meta device (shapes only, nothing computed); None where an operation has no
    meta implementation."""
    saved: list[int] = []
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in seen:  # a tensor saved by several operations is kept once
            seen[id(t)] = t
            saved[-1] += t.numel() * t.element_size()
        return t

    x = _on_meta(x)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for part, part_params, per_task, buffers, stage in segments:
                saved.append(0)
                x = run_segment(
                    part, _on_meta(part_params), x, per_task, _meta_buffers(part, buffers, x), stage
                )
    except (NotImplementedError, RuntimeError):
        return None
    return saved


def plain_tail(saved: list[int] | None) -> int:
    """How many trailing segments run without checkpointing, given each segment's saved bytes:
    as many as save, together, no more than the largest checkpointed segment. Their
    activations are freed early in the backward pass, before any segment is recomputed, so
    they do not raise its peak, and their forward passes are not run twice. None (unknown
    sizes): none."""
    tail = 0
    while saved and tail < len(saved) - 1 and sum(saved[-tail - 1 :]) <= max(saved[: -tail - 1]):
        tail += 1
    return tail


def _on_meta(values):
    """`values`' tensors as empty tensors of the same shapes on the meta device."""
    return tree_map_only(
        torch.Tensor,
        lambda t: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad),
        values,
    )


def _meta_buffers(part: nn.Module, buffers: Params | None, x) -> Params | None:
    """Each task's own meta copy of `part`'s buffers, so that measuring updates none of the
    module's buffers (running statistics, batch counts)."""
    if buffers is not None:
        return _on_meta(buffers)
    tasks = tasks_of(x)
    return {
        n: torch.empty((tasks, *b.shape), dtype=b.dtype, device="meta")
        for n, b in part.named_buffers()
    } or None


def _within(values: Params | None, prefix: str) -> Params | None:
    """The entries of `values` under the submodule `prefix`, named relative to it."""
    if values is None or not prefix:
        return values
    start = len(prefix) + 1
    return {n[start:]: v for n, v in values.items() if n.startswith(prefix + ".")}


def _fresh_leaves(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of `tensors` (no data copied) that require gradients where they did."""
    return [t.detach().requires_grad_(t.requires_grad) for t in tensors]
