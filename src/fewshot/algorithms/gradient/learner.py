"""`GradientLearner`: a model adapted to each task by gradient steps on its support set, and
meta-trained through them. This file holds the learner's settings and its meta-training; the
jobs it hands off have their own files: the inner loop (`inner_loop`), running the tasks in
parallel (`parallel`), activation checkpointing (`checkpointing`) and prediction (`prediction`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import replace_all_batch_norm_modules_

from fewshot.algorithms.base import (
    Algorithm,
    Predictor,
    check_batch_norm_policy,
    has_batch_norm,
)
from fewshot.algorithms.gradient import checkpointing, parallel
from fewshot.algorithms.gradient.inner_loop import InnerLoop, inner_step
from fewshot.algorithms.gradient.parallel import LossFn, default_chunk_size
from fewshot.algorithms.gradient.prediction import GradientPredictor
from fewshot.algorithms.rules import InnerRule, Params
from fewshot.errors import ConfigError, require_positive
from fewshot.tasks import Task

Selection = str | Iterable[str] | Callable[[str], bool] | None


@dataclass
class QueryResult:
    """Each task's query loss after adaptation, its query accuracy (classification), and its
    last support loss; all shaped (tasks,)."""

    losses: torch.Tensor
    accuracy: torch.Tensor | None
    inner_loss: torch.Tensor | None


class GradientLearner(InnerLoop, Algorithm):
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

    adapts_by_steps = True
    # Mini-batches of the support set end with each pass over it (`inner_loop.random_order`).
    whole_passes = False

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
            raise ConfigError(f"`eval_inner_steps` must be >= 0, got {eval_inner_steps}.")
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
        # None where a subclass makes the steps depend on the support set (`evaluation_steps`).
        self.eval_inner_steps: int | None = (
            inner_steps if eval_inner_steps is None else eval_inner_steps
        )
        self.first_order = first_order
        self.loss = loss
        self.inner_batch, self.eval_inner_batch = inner_batch, eval_inner_batch
        self.vectorize = vectorize
        self.chunk_size = chunk_size
        self.checkpoint_inner = checkpoint_inner
        self.batch_norm = check_batch_norm_policy(batch_norm)

    @classmethod
    def training_loss_label(cls, inner_steps: int | None) -> str:
        if inner_steps is None:
            return super().training_loss_label(inner_steps)
        return f"meta-loss on the queries ({inner_steps} inner step{'s' * (inner_steps != 1)})"

    def evaluation_steps(self, support_size: int) -> int | None:
        """The steps `adapt` takes by default on support sets of `support_size` examples."""
        return self.eval_inner_steps

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
        assert steps is not None  # a learner without `eval_inner_steps` passes its steps
        with torch.enable_grad():
            path = self.trajectory(
                support_x,
                support_y,
                steps,
                differentiable=False,
                batch=self.eval_inner_batch,
                whole_passes=self.whole_passes,
            )
        # The tasks' own buffers, where adaptation kept some, go with the predictor.
        buffers = parallel.current_task_buffers()
        return GradientPredictor(self, path.params[-1], support_x, steps, buffers)

    # -- meta-training ----------------------------------------------------------------------

    def meta_loss(self, tasks: Task) -> torch.Tensor:
        return self.query_result(tasks).losses.mean()

    def training_step(self, tasks: Task) -> dict[str, float]:
        """Back-propagate the meta-loss `chunk_size` tasks at a time (one at a time without
        `vectorize`): the same gradient as `meta_loss(tasks).backward()`, with only one chunk's
        graph alive."""
        sums: dict[str, float] = {}
        for chunk in self.chunk_slices(tasks):
            # The backward pass within too: a recomputed inner step runs the model again.
            with parallel.chunk_of_task_buffers(chunk):
                parts = _backward_chunk(self.query_result(tasks[chunk]), len(tasks))
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        return sums

    def chunks(self, tasks: Task) -> Iterator[Task]:
        """The meta-batch in passes of `chunk_size` tasks (one task without `vectorize`)."""
        return (tasks[chunk] for chunk in self.chunk_slices(tasks))

    def chunk_slices(self, tasks: Task) -> list[slice]:
        """The positions of the meta-batch's chunks (`chunks`); a method that runs the chunks
        itself narrows the tasks' own buffers to each (`parallel.chunk_of_task_buffers`)."""
        size = (self.chunk_size or self.auto_chunk_size(tasks)) if self.vectorize else 1
        return parallel.chunk_slices(len(tasks), size)

    def auto_chunk_size(self, tasks: Task) -> int:
        """`default_chunk_size` for this meta-batch: the command line's rule, for a learner
        built without a `chunk_size`."""
        images = tasks.support_x.dim() >= 5  # (tasks, n, channels, height, width)
        examples = tasks.support_x.shape[1] + tasks.query_x.shape[1]
        return default_chunk_size(images, len(tasks), examples, tasks.support_x.device.type)

    def per_task_buffers(self, buffers: Params | None) -> AbstractContextManager[None]:
        """Within, each task's forward passes use its own slice of `buffers`
        (`parallel.per_task_buffers`), in training and in adaptation."""
        return parallel.per_task_buffers(buffers)

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
            whole_passes=self.whole_passes,
        )
        losses: torch.Tensor | int = 0
        for step, weight in enumerate(weights, start=1):
            if weight > 0:
                params = path.params[step] if every_step else path.params[-1]
                outputs = self.query_outputs(params, tasks.query_x, step)
                losses = losses + weight * self.per_task_loss(outputs, tasks.query_y)
        # `outputs` are the last step's, whose weight is never zero.
        losses = cast(torch.Tensor, losses)  # so its term was added: a tensor
        return QueryResult(losses, _accuracy(outputs, tasks.query_y), _last(path.support_losses))

    def query_outputs(
        self, params: Params, query_x: torch.Tensor, steps: int, encoder: Params | None = None
    ) -> torch.Tensor:
        """Outputs of the adapted parameters on the query sets, in the training-time batch-norm
        mode (the query set of a task as one batch); `encoder` overrides the encoder's weights."""
        with inner_step(max(steps - 1, 0)):
            return self._call_model(params, self._encode(query_x, encoder), self._segmented())

    def per_task_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each task's loss, shape (tasks,)."""
        return parallel.per_task_loss(self.loss, outputs, targets, self.vectorize)

    # -- functional calls, vectorised over tasks (`parallel`), checkpointed (`checkpointing`) ---

    def _call_model(self, params: Params, x: torch.Tensor, segmented: bool = False) -> torch.Tensor:
        """The model on every task: task i's inputs x[i] with parameters params[name][i] (and
        buffers, under `per_task_buffers`); `segmented`: one checkpointed segment at a time."""
        buffers = parallel.current_task_buffers()
        if segmented:
            return checkpointing.in_segments(
                self._on_every_task, self.model, params, x, True, buffers
            )
        # The whole model (no `stage`): its outputs are a tensor.
        return cast(torch.Tensor, self._on_every_task(self.model, params, x, True, buffers))

    def _encode(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """The encoder's features of every task's inputs (the inputs themselves without one),
        with the encoder's weights or `params`."""
        if self.encoder is None:
            return x
        params = dict(self.encoder.named_parameters()) if params is None else params
        if self._segmented():
            return checkpointing.in_segments(
                self._on_every_task, self.encoder, params, x, False, None
            )
        return cast(torch.Tensor, self._on_every_task(self.encoder, params, x, False))

    def _segmented(self) -> bool:
        """Whether forward passes outside the inner steps run one checkpointed segment at a
        time: with `checkpoint_inner`, where a graph is being recorded."""
        return self.checkpoint_inner and torch.is_grad_enabled()

    def _on_every_task(
        self,
        module: nn.Module,
        params: Params,
        x: torch.Tensor | tuple,
        params_per_task: bool,
        task_buffers: Params | None = None,
        stage: int | None = None,
    ) -> torch.Tensor | tuple:
        """`parallel.on_every_task`, vectorised or not as the learner is built."""
        return parallel.on_every_task(
            module, params, x, params_per_task, task_buffers, stage, vectorize=self.vectorize
        )

    def _segments(
        self, module: nn.Module, params: Params, params_per_task: bool, task_buffers: Params | None
    ) -> list[checkpointing.Segment]:
        """`checkpointing.segments_of`: `_on_every_task`'s arguments for each segment."""
        return checkpointing.segments_of(module, params, params_per_task, task_buffers)

    def _saved_bytes(
        self, segments: list[checkpointing.Segment], x: torch.Tensor | tuple
    ) -> list[int] | None:
        """`checkpointing.saved_bytes` of the segments, run as this learner runs tasks."""
        return checkpointing.saved_bytes(self._on_every_task, segments, x)

    def _recomputed_update(
        self, params: Params, state: object, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[Params, object, torch.Tensor]:
        """The second-order `_inner_update` under `checkpointing.recomputed_update`."""
        learned = [p for p in self.parameters() if p.requires_grad]
        return checkpointing.recomputed_update(
            self._step_update(step), self.adapted_names, learned, params, state, x, y
        )


def _backward_chunk(result: QueryResult, meta_batch: int) -> dict[str, torch.Tensor]:
    """Back-propagate a chunk's share of the meta-batch's loss (where finite) and return its
    shares of the loss, accuracy and inner loss."""
    loss = result.losses.sum() / meta_batch
    if torch.isfinite(loss):
        loss.backward()
    parts = {"loss": loss.detach()}
    if result.accuracy is not None:
        parts["accuracy"] = result.accuracy.sum() / meta_batch
    if result.inner_loss is not None:
        parts["inner_loss"] = result.inner_loss.detach().sum() / meta_batch
    return parts


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


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    if targets.is_floating_point():
        return None
    return (outputs.detach().argmax(-1) == targets).float().mean(1)


def _last(losses: list[torch.Tensor]) -> torch.Tensor | None:
    return losses[-1] if losses else None
