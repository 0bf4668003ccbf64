"""The inner loop that every gradient-based method shares (MAML, Meta-SGD, ANIL, Reptile, ...).

For each task, starting from phi_0 = theta, the support loss is differentiated and an inner
update rule (`fewshot.algorithms.rules`) takes a step:

    phi_{s+1} = rule(phi_s, grad_phi L_support(phi_s), state_s, s),   s = 0 .. S-1.

The pieces are swappable: the rule (one step size, learned step sizes, Adam, ...), which
parameters adapt (all, the head, a named set) and, separately, which are meta-learned, and an
optional `encoder` run once per task before the inner loop (ANIL's body). The whole trajectory
phi_0 .. phi_S is available (`trajectory(..., keep_all_steps=True)`), for losses after every
step, and the forward pass can read the step index with `current_inner_step()` (for per-step
batch-norm parameters).

How tasks run: theta is expanded into one copy per task and the forward pass is vmapped over
tasks (`torch.func.vmap`); plain `torch.autograd.grad` of the summed support losses gives each
task its own gradient, because the tasks are independent. Every backward pass, the second-order
one included, is ordinary autograd, so fused kernels such as batch norm's stay exact. Without
`vectorize`, tasks run one at a time with plain calls; both compute the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map_only, tree_unflatten
from torch.utils.checkpoint import checkpoint, get_device_states, set_device_states

from fewshot.algorithms.base import (
    Algorithm,
    Predictor,
    check_batch_norm_policy,
    has_batch_norm,
)
from fewshot.algorithms.rules import InnerRule, Params
from fewshot.errors import ConfigError, require_positive
from fewshot.models import checkpoint_segments
from fewshot.tasks import Task

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Selection = str | Iterable[str] | Callable[[str], bool] | None

_INNER_STEP: ContextVar[int] = ContextVar("fewshot_inner_step", default=0)


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


@dataclass
class QueryResult:
    """Each task's query loss after adaptation, its query accuracy (classification), and its
    last support loss; all shaped (tasks,)."""

    losses: torch.Tensor
    accuracy: torch.Tensor | None
    inner_loss: torch.Tensor | None


CPU_IMAGES_PER_PASS = 40  # support + query images one vectorised pass takes on a CPU


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


class GradientLearner(Algorithm):
    """A model adapted to each task by gradient steps on its support set.

    Args:
        model: the network adapted in the inner loop; its parameters are the meta-learned
            initialisation theta. The learner works on a copy: the model passed in is not
            changed. Its batch norm always normalises with batch statistics (running statistics
            are dropped from the copy); `batch_norm` says which batch at prediction.
        rule: the inner update rule, or a function that makes it from the adapted parameters
            (name -> tensor; for rules with a learned value per parameter).
        inner_steps: inner updates per task in meta-training.
        eval_inner_steps: inner updates when adapting a trained learner; default `inner_steps`.
        first_order: treat inner gradients as constants (no second-order term).
        loss: loss(outputs, targets) with mean reduction; cross-entropy by default.
        adapted: which parameters of `model` adapt in the inner loop: None for all that
            require gradients, or names, or a predicate on names, or a name prefix (e.g.
            "head"). The rest keep theta in every task.
        meta_learned: which parameters the outer loop learns, chosen the same way (None: all
            that require gradients). A parameter that adapts but is not meta-learned starts
            every task from its fixed value (e.g. task-specific context parameters at zero).
        encoder: an optional network applied to the inputs once per task, before the inner loop
            (it does not adapt; its parameters are meta-learned through the adapted outputs).
        inner_batch: examples per inner step, drawn as mini-batches from each task's support
            set in a random order (None: the whole support set every step); `eval_inner_batch`
            likewise when adapting a trained learner.
        vectorize: run the tasks of a meta-batch together under `torch.func.vmap`.
        chunk_size: with `vectorize`, tasks per vectorised pass in `training_step`; each pass is
            back-propagated before the next starts, so memory grows with it. None: the command
            line's rule (`default_chunk_size`): for images on a CPU, as many tasks as fit in 40
            support and query images; otherwise the whole meta-batch.
        batch_norm: "transductive" (a task's queries are normalised together, as in Finn et
            al.'s code) or "inductive" (each query with the support set plus itself, as in
            Nichol et al.'s non-transductive evaluation).
        running_statistics: keep the batch-norm layers' running statistics and normalise with
            them in eval mode (adaptation and prediction), as a network pretrained on ordinary
            batches does (the transfer-learning baselines); no query then sees another.
        checkpoint_inner: activation checkpointing in meta-training: each second-order inner
            step keeps only its inputs and is computed again, with its graph, in the backward
            pass (`RecomputedStep`); the query pass (and the encoder's) keeps only the inputs
            of its segments (`models.checkpoint_segments`), recomputed one at a time, but for
            the trailing segments that save no more, together, than the largest (`plain_tail`).
            The same meta-gradient for less memory, at the cost of computing the forward
            passes again; the forward pass must be deterministic and free of side effects.

    Parameters with `requires_grad=False` stay fixed unless named in `adapted`.
    """

    def __init__(
        self,
        model: nn.Module,
        rule: InnerRule | Callable[[Params], InnerRule],
        *,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        loss: LossFn = F.cross_entropy,
        adapted: Selection = None,
        meta_learned: Selection = None,
        encoder: nn.Module | None = None,
        inner_batch: int | None = None,
        eval_inner_batch: int | None = None,
        vectorize: bool = True,
        chunk_size: int | None = None,
        batch_norm: str = "transductive",
        running_statistics: bool = False,
        checkpoint_inner: bool = False,
    ) -> None:
        super().__init__()
        require_positive(inner_steps=inner_steps)
        for name, value in (
            ("chunk_size", chunk_size),
            ("inner_batch", inner_batch),
            ("eval_inner_batch", eval_inner_batch),
        ):
            if value is not None:
                require_positive(**{name: value})
        if eval_inner_steps is not None and eval_inner_steps < 0:
            raise ConfigError(f"eval_inner_steps must be >= 0, got {eval_inner_steps}.")
        keep = copy.deepcopy if running_statistics else _with_batch_statistics_copy
        self.model = keep(model)
        self.encoder = None if encoder is None else keep(encoder)
        self.running_statistics = running_statistics
        self.adapted_names = _select(self.model, adapted)
        self.meta_learned_names = _select(self.model, meta_learned)
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in self.meta_learned_names)
        if not isinstance(rule, InnerRule):
            parameters = dict(self.model.named_parameters())
            rule = rule({n: parameters[n] for n in self.adapted_names})
        self.rule = rule
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.loss = loss
        self.inner_batch, self.eval_inner_batch = inner_batch, eval_inner_batch
        self.vectorize = vectorize
        self.chunk_size = chunk_size
        self.checkpoint_inner = checkpoint_inner
        self.batch_norm = check_batch_norm_policy(batch_norm)
        self._task_buffers: Params | None = None
        self._plain_tails: dict[tuple, int] = {}  # `_in_segments`'s plans, by module and shapes
        self._chunk = slice(None)

    @property
    def predicts_one_query_at_a_time(self) -> bool:
        """Inductive batch norm in a network that has batch norm: each query is predicted with
        its task's support set plus itself."""
        networks = [self.model] + ([self.encoder] if self.encoder is not None else [])
        return (
            self.batch_norm == "inductive"
            and not self.running_statistics
            and any(map(has_batch_norm, networks))
        )

    # -- using a trained learner ------------------------------------------------------------

    def adapt_tasks(self, support_x, support_y, inner_steps=None) -> Predictor:
        if torch.is_inference_mode_enabled():
            raise ConfigError(
                "gradient-based methods adapt with gradients, which inference mode forbids; "
                "use torch.no_grad() instead of torch.inference_mode()."
            )
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        with torch.enable_grad():
            path = self.trajectory(
                support_x, support_y, steps, differentiable=False, batch=self.eval_inner_batch
            )
        return GradientPredictor(self, path.params[-1], support_x, steps, self._task_buffers)

    # -- meta-training ----------------------------------------------------------------------

    def meta_loss(self, tasks: Task) -> torch.Tensor:
        return self.query_result(tasks).losses.mean()

    def training_step(self, tasks: Task) -> dict[str, float]:
        """Back-propagate the meta-loss `chunk_size` tasks at a time (one at a time without
        `vectorize`): the same gradient as `meta_loss(tasks).backward()`, with only one chunk's
        graph alive."""
        sums: dict[str, float] = {}
        for chunk in self.chunks(tasks):
            result = self.query_result(chunk)
            loss = result.losses.sum() / len(tasks)
            if torch.isfinite(loss):
                loss.backward()
            parts = {"loss": loss.detach()}
            if result.accuracy is not None:
                parts["accuracy"] = result.accuracy.sum() / len(tasks)
            if result.inner_loss is not None:
                parts["inner_loss"] = result.inner_loss.detach().sum() / len(tasks)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        return sums

    def chunks(self, tasks: Task) -> Iterator[Task]:
        """The meta-batch in passes of `chunk_size` tasks (one task without `vectorize`)."""
        size = (self.chunk_size or self.auto_chunk_size(tasks)) if self.vectorize else 1
        try:
            for start in range(0, len(tasks), size):
                self._chunk = slice(start, start + size)  # for `per_task_buffers`
                yield tasks[start : start + size]
        finally:
            self._chunk = slice(None)

    def auto_chunk_size(self, tasks: Task) -> int:
        """`default_chunk_size` for this meta-batch: the command line's rule, for a learner
        built without a `chunk_size`."""
        images = tasks.support_x.dim() >= 5  # (tasks, n, channels, height, width)
        examples = tasks.support_x.shape[1] + tasks.query_x.shape[1]
        return default_chunk_size(images, len(tasks), examples, tasks.support_x.device.type)

    @contextlib.contextmanager
    def per_task_buffers(self, buffers: Params | None) -> Iterator[None]:
        """Within, the model's forward passes read and write task i's slice of `buffers` (a
        leading task dimension) in place of the model's own buffers: each task's own copy of
        buffers that the forward pass updates, such as running statistics, which vmap cannot
        write across tasks. Under `chunks`, the slice follows the chunk."""
        previous, self._task_buffers = self._task_buffers, buffers
        try:
            yield
        finally:
            self._task_buffers = previous

    def query_loss_weights(self) -> list[float]:
        """w_1..w_S of each task's meta-loss sum_s w_s L_query(phi_s): the query loss after the
        last step alone (MAML); MAML++'s multi-step loss weights every step."""
        return [0.0] * (self.inner_steps - 1) + [1.0]

    def query_result(self, tasks: Task) -> QueryResult:
        """Each task's meta-loss sum_s w_s L_query(phi_s) (`query_loss_weights`), differentiable
        with respect to theta (and the rule's parameters); steps of weight zero are skipped."""
        weights = self.query_loss_weights()
        every_step = any(w > 0 for w in weights[:-1])
        path = self.trajectory(
            tasks.support_x,
            tasks.support_y,
            self.inner_steps,
            batch=self.inner_batch,
            keep_all_steps=every_step,
        )
        losses = 0
        for step, weight in enumerate(weights, start=1):
            if weight > 0:
                params = path.params[step] if every_step else path.params[-1]
                outputs = self.query_outputs(params, tasks.query_x, step)
                losses = losses + weight * self.per_task_loss(outputs, tasks.query_y)
        # `outputs` are the last step's, whose weight is never zero.
        return QueryResult(losses, _accuracy(outputs, tasks.query_y), _last(path.support_losses))

    # -- the inner loop ---------------------------------------------------------------------

    def trajectory(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        differentiable: bool | None = None,
        batch: int | None = None,
        keep_all_steps: bool = False,
    ) -> Trajectory:
        """The adapted parameters of every task of (x, y) at once, each with a leading task dim:
        phi_0 .. phi_steps with `keep_all_steps` (for losses after every step), else phi_steps.

        `differentiable` (default: whether gradients are enabled) keeps the graph from theta
        (and the rule's parameters) to the result, through the inner gradients too unless
        `first_order`. Otherwise every step starts from detached parameters, so memory does
        not grow with the steps, and the result is a snapshot: later changes to theta do not
        change it. `batch` is the mini-batch size of each step (None: the whole support set).
        """
        differentiable = torch.is_grad_enabled() if differentiable is None else differentiable
        create_graph = differentiable and not self.first_order
        names = self.adapted_names
        with torch.set_grad_enabled(differentiable):
            features = self._encode(x)
        params = self._initial_params(len(x), differentiable)
        order = _random_order(x, batch, steps)
        path, losses = [params], []
        with torch.enable_grad():
            state = self.rule.init_state({n: params[n] for n in names})
            for step in range(steps if names else 0):
                params = _with_gradients(params, names)
                xs, ys = _mini_batch(features, y, order, batch, step)
                update = functools.partial(
                    self._inner_update,
                    step=step,
                    create_graph=create_graph,
                    differentiable=differentiable,
                )
                if create_graph and self.checkpoint_inner:
                    params, state, support_losses = self._recomputed_update(
                        params, state, xs, ys, step
                    )
                else:
                    params, state, support_losses = update(params, state, xs, ys)
                if not differentiable:
                    params = {n: p.detach() for n, p in params.items()}
                    state = _detached(state)
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
        with inner_step(step):
            losses = self.per_task_loss(self._call_model(params, x), y)
        # Summed over tasks: each task's copy receives exactly its own task's gradient.
        grads = torch.autograd.grad(
            losses.sum(),
            [params[n] for n in names],
            create_graph=create_graph,
            allow_unused=True,
        )
        updated, state = self.rule(
            {n: params[n] for n in names},
            dict(zip(names, grads)),
            losses if differentiable else losses.detach(),
            state,
            step,
        )
        return {**params, **updated}, state, losses

    def _recomputed_update(
        self, params: Params, state: object, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[Params, object, torch.Tensor]:
        """The second-order `_inner_update`, keeping only its inputs (`RecomputedStep`): its
        forward pass and its inner gradient are computed again, with their graph, when the
        meta-gradient reaches this step."""
        inputs, spec = tree_flatten((params, state, x, y))
        tensors = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
        results = {}

        def run(values: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
            leaves = list(inputs)
            for i, value in zip(tensors, values, strict=True):
                leaves[i] = value
            p, s, xs, ys = tree_unflatten(leaves, spec)
            p, s, losses = self._inner_update(
                _with_gradients(p, self.adapted_names), s, xs, ys, step, create_graph, True
            )
            flat, results["spec"] = tree_flatten(({n: p[n] for n in self.adapted_names}, s, losses))
            results["flat"] = flat
            return [v for v in flat if isinstance(v, torch.Tensor)]

        learned = [p for p in self.parameters() if p.requires_grad]
        outputs = iter(
            RecomputedStep.apply(run, len(tensors), *(inputs[i] for i in tensors), *learned)
        )
        flat = [next(outputs) if isinstance(v, torch.Tensor) else v for v in results["flat"]]
        updated, state, losses = tree_unflatten(flat, results["spec"])
        return {**params, **updated}, state, losses

    def _initial_params(self, tasks: int, differentiable: bool) -> Params:
        """phi_0 = theta for every task: differentiable views of the meta-learned parameters, or
        detached copies (a snapshot) when nothing is differentiated."""
        params = {}
        for name, theta in self.model.named_parameters():
            if not differentiable:
                theta = theta.detach().clone()
            elif name not in self.meta_learned_names:
                theta = theta.detach()
            params[name] = theta.expand(tasks, *theta.shape)
        return params

    def query_outputs(
        self, params: Params, query_x: torch.Tensor, steps: int, encoder: Params | None = None
    ) -> torch.Tensor:
        """Outputs of the adapted parameters on the query sets, in the training-time batch-norm
        mode (the query set of a task as one batch); `encoder` overrides the encoder's weights."""
        with inner_step(max(steps - 1, 0)):
            return self._call_model(params, self._encode(query_x, encoder), self._segmented())

    def per_task_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each task's loss, shape (tasks,)."""
        if self._vmapped(outputs):
            return vmap(self.loss)(outputs, targets)
        return torch.stack([self.loss(out, target) for out, target in zip(outputs, targets)])

    # -- functional calls, vectorised over tasks --------------------------------------------

    def _call_model(self, params: Params, x: torch.Tensor, segmented: bool = False) -> torch.Tensor:
        """The model on every task: task i's inputs x[i] with parameters params[name][i] (and
        buffers, under `per_task_buffers`); `segmented`: one checkpointed segment at a time."""
        buffers = self._task_buffers
        if buffers is not None:
            buffers = {n: b[self._chunk] for n, b in buffers.items()}
        if segmented:
            return self._in_segments(self.model, params, x, True, buffers)
        return self._on_every_task(self.model, params, x, True, task_buffers=buffers)

    def _encode(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """The encoder's features of every task's inputs (the inputs themselves without one),
        with the encoder's weights or `params`."""
        if self.encoder is None:
            return x
        params = dict(self.encoder.named_parameters()) if params is None else params
        if self._segmented():
            return self._in_segments(self.encoder, params, x, False, None)
        return self._on_every_task(self.encoder, params, x, params_per_task=False)

    def _segmented(self) -> bool:
        """Whether forward passes outside the inner steps run one checkpointed segment at a
        time: with `checkpoint_inner`, where a graph is being recorded."""
        return self.checkpoint_inner and torch.is_grad_enabled()

    def _in_segments(
        self,
        module: nn.Module,
        params: Params,
        x: torch.Tensor,
        params_per_task: bool,
        task_buffers: Params | None,
    ) -> torch.Tensor:
        """`_on_every_task` one segment of `module` at a time (`models.checkpoint_segments`),
        each under activation checkpointing but the last few (`plain_tail`): the backward pass
        keeps only the checkpointed segments' inputs and recomputes one segment's activations
        at a time."""
        segments = self._segments(module, params, params_per_task, task_buffers)
        key = (id(module), params_per_task, *((t.shape, t.dtype) for t in tree_leaves(x)))
        if key not in self._plain_tails:
            self._plain_tails[key] = plain_tail(self._saved_bytes(segments, x))
        plain = self._plain_tails[key]
        for k, (part, part_params, per_task, buffers, stage) in enumerate(segments):
            args = (part, part_params, x, per_task, buffers, stage)
            if k >= len(segments) - plain:
                x = self._on_every_task(*args)
            else:
                x = checkpoint(self._on_every_task, *args, use_reentrant=False)
        return x

    @staticmethod
    def _segments(
        module: nn.Module, params: Params, params_per_task: bool, task_buffers: Params | None
    ) -> list[tuple]:
        """`_on_every_task`'s arguments but the inputs, for each of `module`'s checkpoint
        segments: (part, its params, params_per_task, its task buffers, stage)."""
        return [
            (part, _within(params, prefix), params_per_task, _within(task_buffers, prefix), stage)
            for prefix, part, stage in checkpoint_segments(module)
        ]

    def _saved_bytes(self, segments: list[tuple], x: torch.Tensor | tuple) -> list[int] | None:
        """The bytes each segment saves for the backward pass on inputs shaped as `x`, measured
        on the meta device (shapes only, nothing computed); None where an operation has no
        meta implementation."""
        saved, seen = [], {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in seen:  # a tensor saved by several operations is kept once
                seen[id(t)] = t
                saved[-1] += t.numel() * t.element_size()
            return t

        def on_meta(values):
            return tree_map_only(
                torch.Tensor,
                lambda t: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad),
                values,
            )

        def meta_buffers(part: nn.Module, buffers: Params | None, x) -> Params | None:
            # Each task's own meta copy, so that no forward pass here updates the module's
            # buffers (running statistics, batch counts).
            if buffers is not None:
                return on_meta(buffers)
            tasks = _tasks(x)
            return {
                n: torch.empty((tasks, *b.shape), dtype=b.dtype, device="meta")
                for n, b in part.named_buffers()
            } or None

        x = on_meta(x)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                for part, part_params, per_task, buffers, stage in segments:
                    saved.append(0)
                    x = self._on_every_task(
                        part,
                        on_meta(part_params),
                        x,
                        per_task,
                        meta_buffers(part, buffers, x),
                        stage,
                    )
        except (NotImplementedError, RuntimeError):
            return None
        return saved

    def _on_every_task(
        self,
        module: nn.Module,
        params: Params,
        x: torch.Tensor,
        params_per_task: bool,
        task_buffers: Params | None = None,
        stage: int | None = None,
    ) -> torch.Tensor:
        """`module` called on each task's inputs x[i], vectorised over tasks or one by one, with
        task i's slice of `params` (`params_per_task`) or the same `params` for all, and the
        module's buffers, or task i's slice of `task_buffers` (each task's own copy, for
        buffers the forward pass updates in place, such as running statistics). With `stage`,
        `module(x, stage=stage)` (`models.checkpoint_segments`), whose x and result may be
        tuples of tensors with a leading task dimension."""
        buffers = dict(module.named_buffers()) if task_buffers is None else task_buffers
        call = _call if stage is None else functools.partial(_call, stage=stage)
        if self._vmapped(x):
            dims = (
                None,
                0 if params_per_task else None,
                None if task_buffers is None else 0,
                0,
            )
            return vmap(call, in_dims=dims, randomness="different")(module, params, buffers, x)

        def task_slice(values: Params, per_task: bool, i: int) -> Params:
            return {n: v[i] for n, v in values.items()} if per_task else values

        outputs = [
            call(
                module,
                task_slice(params, params_per_task, i),
                task_slice(buffers, task_buffers is not None, i),
                _task(x, i),
            )
            for i in range(_tasks(x))
        ]
        return _stacked(outputs)

    def _vmapped(self, x: torch.Tensor | tuple) -> bool:
        # A single task runs faster as a plain call (Conv4 on CPU; docs/performance.md).
        return self.vectorize and _tasks(x) > 1


class GradientPredictor(Predictor):
    """Predictions of adapted parameters, in the learner's batch-norm mode.

    `params` holds the adapted parameters (leading task dimension), for
    `torch.func.functional_call(learner.model, ...)` on one task's slice, and `buffers` the
    tasks' own buffers where adaptation kept some (`per_task_buffers`). The predictor is a
    snapshot: training the learner further does not change its predictions.
    """

    def __init__(
        self,
        learner: GradientLearner,
        params: Params,
        support_x: torch.Tensor,
        steps: int,
        buffers: Params | None = None,
    ):
        super().__init__(self._outputs)
        self.learner, self.params, self.support_x, self.steps = learner, params, support_x, steps
        self.buffers = buffers
        encoder = learner.encoder
        self.encoder_params = (
            None
            if encoder is None
            else {n: p.detach().clone() for n, p in encoder.named_parameters()}
        )

    def _outputs(self, query_x: torch.Tensor) -> torch.Tensor:
        learner = self.learner
        if not learner.predicts_one_query_at_a_time:
            with learner.per_task_buffers(self.buffers):
                return learner.query_outputs(self.params, query_x, self.steps, self.encoder_params)
        # Inductive batch norm: each query is normalised with its task's support set plus
        # itself, so no query sees another (Nichol et al. 2018). Task by task, all queries
        # of a task at once: (queries, support + 1, ...) with the task's parameters repeated.
        outputs = []
        for i in range(len(query_x)):
            queries = query_x[i]
            support = self.support_x[i].expand(len(queries), *self.support_x.shape[1:])
            batches = torch.cat([support, queries.unsqueeze(1)], dim=1)
            params = {n: p[i].expand(len(queries), *p.shape[1:]) for n, p in self.params.items()}
            out = learner.query_outputs(params, batches, self.steps, self.encoder_params)
            outputs.append(out[:, -1])
        return torch.stack(outputs)


def _call(
    module: nn.Module, params: Params, buffers: Params, x: torch.Tensor, **kwargs: object
) -> torch.Tensor:
    return functional_call(module, (params, buffers), (x,), kwargs)


def _tasks(x: torch.Tensor | tuple) -> int:
    """The number of tasks of inputs `x` (a tensor or a tuple of tensors): the first dim."""
    return len(x[0] if isinstance(x, tuple) else x)


def _task(x: torch.Tensor | tuple, i: int) -> torch.Tensor | tuple:
    """Task i's slice of inputs `x`, a tensor or a tuple of tensors."""
    return tuple(t[i] for t in x) if isinstance(x, tuple) else x[i]


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


def _fresh_leaves(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of `tensors` (no data copied) that require gradients where they did."""
    return [t.detach().requires_grad_(t.requires_grad) for t in tensors]


def _stacked(outputs: list) -> torch.Tensor | tuple:
    """Per-task outputs (tensors or tuples of tensors) stacked along a new task dim; one task's
    as a view, since a copy of each activation would cost memory and time."""
    if isinstance(outputs[0], tuple):
        return tuple(_stacked(list(parts)) for parts in zip(*outputs))
    if len(outputs) == 1:
        return outputs[0].unsqueeze(0)
    return torch.stack(outputs)


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


def _within(values: Params | None, prefix: str) -> Params | None:
    """The entries of `values` under the submodule `prefix`, named relative to it."""
    if values is None or not prefix:
        return values
    start = len(prefix) + 1
    return {n[start:]: v for n, v in values.items() if n.startswith(prefix + ".")}


def _with_batch_statistics_copy(model: nn.Module) -> nn.Module:
    """A copy whose batch-norm layers normalise with the current batch's statistics only: under
    vmap the batch is one task's, so each task is normalised with its own statistics."""
    model = copy.deepcopy(model)
    replace_all_batch_norm_modules_(model)
    return model


def _select(model: nn.Module, selection: Selection) -> list[str]:
    """The parameter names a selection picks; None picks those that require gradients."""
    names = [n for n, _ in model.named_parameters()]
    if selection is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(selection, str):
        chosen = [n for n in names if n == selection or n.startswith(selection + ".")]
    elif callable(selection):
        chosen = [n for n in names if selection(n)]
    else:
        wanted = set(selection)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise ConfigError(
                f"the model has no parameters named {', '.join(unknown)}; its parameters are "
                f"{', '.join(names)}."
            )
        chosen = [n for n in names if n in wanted]
    if not chosen:
        raise ConfigError(f"{selection!r} selects none of the model's parameters.")
    return chosen


def _with_gradients(params: Params, names: list[str]) -> Params:
    """`params` with the adapted ones made leaves that require gradients where they are not
    already part of a graph (detached copies, parameters that are not meta-learned)."""
    return {
        n: p.requires_grad_() if n in names and not p.requires_grad else p
        for n, p in params.items()
    }


def _random_order(x: torch.Tensor, batch: int | None, steps: int) -> torch.Tensor | None:
    """For mini-batched inner steps: each task's examples in a new random order for every
    pass over them (an epoch), the passes concatenated, as many as `steps` batches need.
    Drawn from torch's global generator, which the resumable checkpoint holds."""
    n = x.shape[1]
    if batch is None or batch >= n:
        return None
    epochs = -(-steps * batch // n)
    keys = torch.rand(x.shape[0], epochs, n, device=x.device)
    return keys.argsort(dim=2).flatten(1)


def _mini_batch(x, y, order, batch, step):
    """Step `step`'s mini-batch: the next `batch` examples of each task's order."""
    if order is None:
        return x, y
    index = order[:, step * batch : (step + 1) * batch]
    rows = torch.arange(len(order), device=order.device).unsqueeze(1)
    return x[rows, index], y[rows, index]


def _detached(state):
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: _detached(v) for k, v in state.items()}
    if isinstance(state, tuple | list):
        return type(state)(_detached(v) for v in state)
    return state


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    if targets.is_floating_point():
        return None
    return (outputs.detach().argmax(-1) == targets).float().mean(1)


def _last(losses: list[torch.Tensor]) -> torch.Tensor | None:
    return losses[-1] if losses else None
