"""The inner loop: for each task, starting from phi_0 = theta, the support loss is
differentiated and the inner update rule (`fewshot.algorithms.rules`) takes a step,

    phi_{s+1} = rule(phi_s, grad_phi L_support(phi_s), state_s, s),   s = 0 .. S-1,

for every task of a meta-batch at once (each parameter with a leading task dimension). The
forward pass can read the step it belongs to with `current_inner_step()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fewshot.algorithms.gradient import grouped
from fewshot.algorithms.rules import InnerRule, Params

_INNER_STEP: ContextVar[int] = ContextVar("fewshot_inner_step", default=0)

# One inner step of every task: (params, state, x, y, create_graph) -> (params, state, losses).
Update = Callable[
    [Params, object, torch.Tensor, torch.Tensor, bool], tuple[Params, object, torch.Tensor]
]


def current_inner_step() -> int:
    """The inner step the forward pass belongs to, for layers with per-step parameters.

    The support pass that takes step s sees s; a query pass on phi_s (after s steps) sees
    s - 1, the last step taken (0 before any).
    """
    return _INNER_STEP.get()


@contextlib.contextmanager
def context_value(variable: ContextVar, value: object) -> Iterator[None]:
    """`variable` holds `value` within the block, its previous value after it."""
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def inner_step(step: int):
    """The forward passes within belong to inner step `step` (`current_inner_step`)."""
    return context_value(_INNER_STEP, step)


@dataclass
class Trajectory:
    """phi_0 .. phi_S (every model parameter, leading task dimension) and the support losses
    L_support(phi_s) of the steps taken, each shaped (tasks,)."""

    params: list[Params]
    support_losses: list[torch.Tensor]


class InnerLoop:
    """`GradientLearner`'s inner loop: the adapted parameters of every task (`trajectory`)."""

    # What the inner loop reads of the `GradientLearner` it is part of.
    model: nn.Module
    rule: InnerRule
    adapted_names: list[str]
    meta_learned_names: list[str]
    first_order: bool
    checkpoint_inner: bool

    if TYPE_CHECKING:

        def _encode(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor: ...

        def _call_model(
            self, params: Params, x: torch.Tensor, segmented: bool = False
        ) -> torch.Tensor: ...

        def per_task_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

        def _recomputed_update(
            self, params: Params, state: object, x: torch.Tensor, y: torch.Tensor, step: int
        ) -> tuple[Params, object, torch.Tensor]: ...

    def trajectory(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        differentiable: bool | None = None,
        batch: int | None = None,
        keep_all_steps: bool = False,
        whole_passes: bool = False,
    ) -> Trajectory:
        """The adapted parameters of every task of (x, y) at once, each with a leading task dim:
        phi_0 .. phi_steps with `keep_all_steps` (for losses after every step), else phi_steps.

        `differentiable` (default: whether gradients are enabled) keeps the graph from theta
        (and the rule's parameters) to the result, through the inner gradients too unless
        `first_order`. Otherwise every step starts from detached parameters, so memory does
        not grow with the steps, and the result is a snapshot: later changes to theta do not
        change it. `batch` is the mini-batch size of each step (None: the whole support set);
        `whole_passes` cuts each pass over a task's examples into its own mini-batches, the
        last one smaller (`random_order`).
        """
        differentiable = torch.is_grad_enabled() if differentiable is None else differentiable
        create_graph = differentiable and not self.first_order
        names = self.adapted_names
        with torch.set_grad_enabled(differentiable):
            features = self._encode(x)
        params = self._initial_params(len(x), differentiable)
        order = random_order(x, batch, steps, whole_passes)
        path, losses = [params], []
        with torch.enable_grad():
            state = self.rule.init_state({n: params[n] for n in names})
            for step in range(steps if names else 0):
                params = with_gradients(params, names)
                xs, ys = mini_batch(features, y, order, batch, step, whole_passes)
                if create_graph and self.checkpoint_inner:
                    params, state, support_losses = self._recomputed_update(
                        params, state, xs, ys, step
                    )
                else:
                    params, state, support_losses = self._inner_update(
                        params, state, xs, ys, step, create_graph, differentiable
                    )
                if not differentiable:
                    params = {n: p.detach() for n, p in params.items()}
                    state = detached(state)
                path = [*path, params] if keep_all_steps else [params]
                losses.append(support_losses.detach())
        return Trajectory(path, losses)

    def _inner_update(
        self,
        params: Params,
        state: object,
        x: torch.Tensor,
        y: torch.Tensor,
        step: int,
        create_graph: bool,
        differentiable: bool,
    ) -> tuple[Params, object, torch.Tensor]:
        """One inner step of every task: phi_{s+1} = rule(phi_s, grad L_support(phi_s), ...),
        the rule's next state and the support losses L_support(phi_s), shaped (tasks,); the
        rule reads the losses as constants unless `differentiable`."""
        names = self.adapted_names
        # A second-order step, recomputed or not: `create_graph` differs between a recomputed
        # step's forward and backward passes, which must run (and round) alike.
        second_order = differentiable and not self.first_order
        with inner_step(step), grouped.differentiated_twice(second_order):
            losses = self.per_task_loss(self._call_model(params, x), y)
        # Summed over tasks: each task's copy receives exactly its own task's gradient.
        grads = torch.autograd.grad(
            losses.sum(),
            [params[n] for n in names],
            create_graph=create_graph,
            allow_unused=True,
        )
        # Without `differentiable` nothing is differentiated through the update: no graph of
        # the rule is kept (Meta-LSTM's LSTM over every coordinate, Adam's moments).
        with torch.set_grad_enabled(differentiable):
            updated, state = self.rule(
                {n: params[n] for n in names},
                dict(zip(names, grads)),
                losses if differentiable else losses.detach(),
                state,
                step,
            )
        return {**params, **updated}, state, losses

    def _step_update(self, step: int) -> Update:
        """Step `step`'s differentiable `_inner_update`, starting from parameters made to
        require gradients: what a recomputed step runs (`checkpointing.recomputed_update`)."""

        def update(params, state, x, y, create_graph):
            params = with_gradients(params, self.adapted_names)
            return self._inner_update(params, state, x, y, step, create_graph, True)

        return update

    def _initial_params(self, tasks: int, differentiable: bool) -> Params:
        """phi_0 = theta for every task: differentiable views of the meta-learned parameters, or
        detached copies (a snapshot) when nothing is differentiated."""
        params = {}
        theta: torch.Tensor  # a parameter, or a detached view or copy of it
        for name, theta in self.model.named_parameters():
            if not differentiable:
                theta = theta.detach().clone()
            elif name not in self.meta_learned_names:
                theta = theta.detach()
            params[name] = theta.expand(tasks, *theta.shape)
        return params


def with_gradients(params: Params, names: list[str]) -> Params:
    """`params` with the adapted ones made leaves that require gradients where they are not
    already part of a graph (detached copies, parameters that are not meta-learned)."""
    return {
        n: p.requires_grad_() if n in names and not p.requires_grad else p
        for n, p in params.items()
    }


def random_order(
    x: torch.Tensor, batch: int | None, steps: int, whole_passes: bool = False
) -> torch.Tensor | None:
    """For mini-batched inner steps: each task's examples in a new random order for every
    pass over them (an epoch), the passes concatenated, as many as `steps` batches need.

    Batches of exactly `batch` run on from one pass into the next (Nichol et al.'s Reptile);
    with `whole_passes` each pass of n examples is cut into ceil(n / batch) batches of its
    own, the last one smaller (Chen et al.'s fine-tuning: 100 passes over a 5-example support
    set in batches of 4 are 200 steps, of 4 and 1 examples). Drawn from torch's global
    generator, which the resumable checkpoint holds."""
    n = x.shape[1]
    if batch is None or batch >= n:
        return None
    epochs = -(-steps // steps_per_pass(n, batch)) if whole_passes else -(-steps * batch // n)
    keys = torch.rand(x.shape[0], epochs, n, device=x.device)
    return keys.argsort(dim=2).flatten(1)


def steps_per_pass(n: int, batch: int) -> int:
    """Mini-batches of at most `batch` in one pass over `n` examples."""
    return -(-n // batch)


def mini_batch(x, y, order, batch, step, whole_passes=False):
    """Step `step`'s mini-batch: the next `batch` examples of each task's order (with
    `whole_passes`, no further than the end of the pass)."""
    if order is None:
        return x, y
    if whole_passes:
        n = x.shape[1]
        epoch, within = divmod(step, steps_per_pass(n, batch))
        start = epoch * n + within * batch
        end = epoch * n + min((within + 1) * batch, n)
    else:
        start, end = step * batch, (step + 1) * batch
    index = order[:, start:end]
    rows = torch.arange(len(order), device=order.device).unsqueeze(1)
    return x[rows, index], y[rows, index]


def detached(state):
    """The rule's state with every tensor detached (a snapshot that holds no graph)."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: detached(v) for k, v in state.items()}
    if isinstance(state, tuple | list):
        return type(state)(detached(v) for v in state)
    return state
