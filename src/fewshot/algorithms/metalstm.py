"""The Meta-LSTM meta-learner (Ravi & Larochelle, 2017, "Optimization as a Model for Few-Shot
Learning").

An LSTM learns the learner's update rule. Its cell state is the learner's parameters: with the
gradient g_t and loss L_t of the learner's support loss at theta_{t-1},

    theta_t = c_t = f_t ⊙ c_{t-1} + i_t ⊙ (-g_t),
    i_t = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I),
    f_t = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F),

where h_t is the hidden state of a first, ordinary LSTM fed with the preprocessed gradient and
loss (`preprocess`). i_t is a learned step size and f_t a learned shrinkage, per coordinate.
Every coordinate has its own hidden and cell state, but all share the LSTMs' weights, so the
meta-learner's size does not grow with the learner's. The learner's initial parameters theta_0
are the LSTM's initial cell state c_0, meta-learned with it: here, the wrapped model's
parameters. As in the paper, gradients and losses enter as constants (no second-order term).
The shared inner loop (`GradientLearner`) with `MetaLSTMRule`, vectorised over tasks.

Batch norm as in the paper: batch statistics for the support and query sets in meta-training;
at prediction ("inductive", the default) the queries are normalised with running averages of
the support set's statistics, collected during that task's adaptation and reset for every task,
so no query sees another. "transductive" normalises the queries as one batch. The averages move
towards each support pass's statistics b as r <- (1 - m) r + m b (`statistics_momentum` m), or
weigh every pass equally (m = 0): the passes see the learner at every step of its adaptation,
so a high m normalises the queries as the adapted learner sees its support set.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fewshot.algorithms.batchnorm import (
    PerStepBatchNorm,
    batch_statistics,
    per_step_batch_norm_,
    per_task_copies,
    running_statistics,
    tracking_statistics,
)
from fewshot.algorithms.gradient import GradientLearner
from fewshot.algorithms.recipes import FINN_2017
from fewshot.algorithms.registry import InnerLoopSettings, Method, Problem, register, setting
from fewshot.algorithms.rules import InnerRule, Params
from fewshot.errors import ConfigError, require_positive
from fewshot.tasks import Task

PREPROCESSING_P = 10.0  # Andrychowicz et al.'s p
BLOCK_ROWS = 1 << 14  # coordinates the rule updates at once (docs/performance.md)
STATISTICS_MOMENTUM = 0.95  # chosen on the validation classes: docs/methods/meta-lstm.md


def preprocess(x: torch.Tensor, p: float = PREPROCESSING_P) -> torch.Tensor:
    """Andrychowicz et al. (2016)'s scaling of gradients and losses, on a new last dimension:

        x -> (log|x| / p, sign(x))  if |x| >= e^-p,     (-1, e^p x)  otherwise,

    which keeps magnitudes over many orders in a range an LSTM can read.
    """
    large = x.abs() >= math.exp(-p)
    magnitude = torch.where(large, x.abs().clamp_min(math.exp(-p)).log() / p, -1.0)
    sign = torch.where(large, x.sign(), math.exp(p) * x)
    return torch.stack([magnitude, sign], dim=-1)


class MetaLSTMRule(InnerRule):
    """The meta-learner's update, one step for every coordinate of every task at once.

    Args:
        hidden_size: the first LSTM's hidden size (20 in the paper).
        initial_step_size: the input gate's value at the start of meta-training; its bias starts
            at logit(initial_step_size) + U(-0.5, 0.5) (the paper's U(-5, -4) is 0.01 this way).

    The forget gate's bias starts in U(4, 6) (f near 1: keep the parameters), the gate weights in
    U(-0.01, 0.01), as in the paper.
    """

    def __init__(self, hidden_size: int = 20, initial_step_size: float = 0.01) -> None:
        super().__init__()
        require_positive(hidden_size=hidden_size)
        if not 0 < initial_step_size < 1:
            raise ConfigError(
                f"Meta-LSTM's initial step size (`inner_lr`) is an input-gate value and must lie "
                f"in (0, 1), got {initial_step_size}."
            )
        self.hidden_size = hidden_size
        self.lstm = nn.LSTMCell(4, hidden_size)
        # Inputs of each gate: the first LSTM's h_t, theta_{t-1} and the gate's previous value.
        self.input_gate = nn.Linear(hidden_size + 2, 1)
        self.forget_gate = nn.Linear(hidden_size + 2, 1)
        logit = math.log(initial_step_size / (1 - initial_step_size))
        with torch.no_grad():
            for gate in (self.input_gate, self.forget_gate):
                gate.weight.uniform_(-0.01, 0.01)
            self.input_gate.bias.uniform_(logit - 0.5, logit + 0.5)
            self.forget_gate.bias.uniform_(4.0, 6.0)

    def init_state(self, params: Params) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per block of coordinates (`coordinate_blocks`): the first LSTM's (h, c), each
        (hidden, rows), and the previous gates (i, f), (2, rows); zeros."""
        like = next(iter(params.values()))
        tasks, coordinates = len(like), sum(p[0].numel() for p in params.values())
        state = []
        for _, rows in coordinate_blocks(tasks, coordinates):
            zeros = like.new_zeros(self.hidden_size, rows.stop - rows.start)
            state.append((zeros, zeros, like.new_zeros(2, rows.stop - rows.start)))
        return state

    def forward(self, params, grads, losses, state, step):
        names = list(params)
        tasks = params[names[0]].shape[0]
        theta = torch.cat([params[n].reshape(tasks, -1) for n in names], dim=1)
        gradient = torch.cat(
            [
                (torch.zeros_like(params[n]) if grads[n] is None else grads[n].detach()).reshape(
                    tasks, -1
                )
                for n in names
            ],
            dim=1,
        )
        # The LSTM's input is (preprocessed gradient, preprocessed loss); the loss is one per
        # task, so its part of the gates is one column per task, read against a row of ones.
        hidden = self.lstm.hidden_size
        w_gradient, w_loss = self.lstm.weight_ih[:, :2], self.lstm.weight_ih[:, 2:]
        bias = self.lstm.bias_ih + self.lstm.bias_hh
        task_bias = torch.addmm(bias, preprocess(losses.detach()), w_loss.T)  # (tasks, 4 hidden)
        gradient_inputs = preprocess(gradient).movedim(-1, 0)  # (2, tasks, coordinates)
        gate_weights = self._gate_weights()
        # Each task's weights of all four gates, for one product a block:
        # (4 hidden, 2 + hidden + 1) x rows of (gradient, h, ones).
        weights = [torch.cat([w_gradient, self.lstm.weight_hh, b[:, None]], 1) for b in task_bias]
        blocks, new_state = [], []
        for (task, rows), block_state in zip(
            coordinate_blocks(tasks, theta.shape[1]), state, strict=True
        ):
            h, c, gates = block_state
            inputs = torch.cat([gradient_inputs[:, task, rows], h, h.new_ones(1, h.shape[1])])
            h, c = self._lstm_step(weights[task] @ inputs, c, hidden)
            gates, new = self._update(
                h, theta[task, rows], gradient[task, rows], gates, gate_weights
            )
            blocks.append(new)
            new_state.append((h, c, gates))
        new = torch.cat(blocks).reshape(tasks, -1)
        updated, start = {}, 0
        for n in names:
            size = params[n][0].numel()
            updated[n] = new[:, start : start + size].reshape(params[n].shape)
            start += size
        return updated, new_state

    def _gate_weights(self) -> tuple[torch.Tensor, ...]:
        """The input and forget gates' weights stacked, (i, f) in rows: on h_t (2, hidden), on
        theta_{t-1} and on the previous gate (2, 1) each, and the biases (2, 1)."""
        hidden = self.hidden_size
        weights = torch.cat([self.input_gate.weight, self.forget_gate.weight])
        biases = torch.cat([self.input_gate.bias, self.forget_gate.bias])
        return weights[:, :hidden], weights[:, hidden:-1], weights[:, -1:], biases[:, None]

    @staticmethod
    def _lstm_step(
        gates: torch.Tensor, c: torch.Tensor, hidden: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`nn.LSTMCell`'s update from its gates, laid out (i, f, g, o) x hidden by rows, so
        that each is a contiguous block: c' = f c + i g, h' = o tanh(c')."""
        input_forget = torch.sigmoid(gates[: 2 * hidden])
        i, f = input_forget[:hidden], input_forget[hidden:]
        g, o = torch.tanh(gates[2 * hidden : 3 * hidden]), torch.sigmoid(gates[3 * hidden :])
        c = torch.addcmul(f * c, i, g)
        return o * torch.tanh(c), c

    @staticmethod
    def _update(h, theta, gradient, previous, gate_weights):
        """The gates (i, f) = sigmoid(W [h_t, theta_{t-1}, gate_{t-1}] + b), rows (2, rows), and
        the updated coordinates f theta - i g."""
        on_h, on_theta, on_previous, bias = gate_weights
        logits = torch.addmm(bias, on_h, h) + on_theta * theta + on_previous * previous
        gates = torch.sigmoid(logits)
        return gates, torch.addcmul(gates[1] * theta, gates[0], gradient, value=-1)


def coordinate_blocks(tasks: int, coordinates: int) -> list[tuple[int, slice]]:
    """(task, coordinates) of each block the rule updates at once: at most `BLOCK_ROWS`
    coordinates of one task, so that a block's gates (4 hidden x rows) stay in the processor's
    cache, where those of every coordinate of a batch of tasks (millions) would not."""
    return [
        (task, slice(start, min(start + BLOCK_ROWS, coordinates)))
        for task in range(tasks)
        for start in range(0, coordinates, BLOCK_ROWS)
    ]


class MetaLSTM(GradientLearner):
    """The Meta-LSTM meta-learner around any `nn.Module` (the learner; a copy is trained).

    Args:
        model: the learner; its parameters are the meta-learned initial cell state c_0.
        inner_steps: updates T per task in meta-training.
        hidden_size: the first LSTM's hidden size.
        initial_step_size: the input gate's initial value (`MetaLSTMRule`).
        gradient_clip: the meta-gradient's norm is clipped to this (None: no clipping) by
            `clip_gradients`, which `meta_step` calls; a loop of your own calls it before
            `optimizer.step()`.
        statistics_momentum: m of the support set's batch-norm averages at prediction (the
            inductive policy): r <- (1 - m) r + m b after each support pass; 0 weighs every
            pass equally.
        options: `GradientLearner`'s other keyword arguments (eval_inner_steps, loss, adapted,
            inner_batch, eval_inner_batch, vectorize, chunk_size, batch_norm).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int = 12,
        hidden_size: int = 20,
        initial_step_size: float = 0.01,
        gradient_clip: float | None = 0.25,
        statistics_momentum: float = STATISTICS_MOMENTUM,
        **options: Any,
    ) -> None:
        if gradient_clip is not None and gradient_clip <= 0:
            raise ConfigError(f"`gradient_clip` must be positive, got {gradient_clip}.")
        if not 0 <= statistics_momentum <= 1:
            raise ConfigError(f"statistics_momentum must lie in [0, 1], got {statistics_momentum}.")
        model = copy.deepcopy(model)
        # Whatever the policy, so that a model trained under one loads under the other.
        per_step_batch_norm_(model, per_step_weights=False, momentum=None)
        rule = MetaLSTMRule(hidden_size, initial_step_size)
        options.setdefault("batch_norm", "inductive")
        super().__init__(model, rule, inner_steps=inner_steps, first_order=True, **options)
        self.gradient_clip = gradient_clip
        for layer in self.model.modules():
            if isinstance(layer, PerStepBatchNorm):
                layer.use_running_statistics = self.batch_norm == "inductive"
                # Built as an equal average so that its buffers (the pass count among them)
                # are the same whatever m, and a run loads under any value.
                layer.momentum = statistics_momentum or None

    @property
    def predicts_one_query_at_a_time(self) -> bool:
        """False: under inductive batch norm Meta-LSTM normalises the queries with running
        averages of the support set's statistics, so no query sees another and they are
        predicted together."""
        return False  # inductive queries read the support set's averages, not each other

    def training_step(self, tasks: Task) -> dict[str, float]:
        """The meta-gradient of one meta-batch, with the support and query sets normalised by
        their batch statistics (the paper's meta-training). Its norm is clipped to
        `gradient_clip` by `clip_gradients`, which `meta_step` calls after it (after averaging
        the gradient over processes, when there are several)."""
        with batch_statistics():
            return super().training_step(tasks)

    def adapt_tasks(self, support_x, support_y, inner_steps=None):
        """With the inductive policy, each task keeps running averages of its support set's
        batch-norm statistics over the inner steps (reset for every task), and the predictor
        normalises the queries with them: the paper's test-time batch norm."""
        if self.batch_norm != "inductive":
            return super().adapt_tasks(support_x, support_y, inner_steps)
        averages = per_task_copies(running_statistics(self.model), len(support_x))
        with self.per_task_buffers(averages), tracking_statistics():
            return super().adapt_tasks(support_x, support_y, inner_steps)


@dataclass
class MetaLSTMSettings(InnerLoopSettings):
    hidden_size: int | None = setting("Meta-LSTM: the first LSTM's hidden size.", fallback=20)
    gradient_clip: float | None = setting(
        "Meta-LSTM: clip the meta-gradient's norm to this (0: no clipping).", fallback=0.25
    )
    statistics_momentum: float | None = setting(
        "Meta-LSTM: momentum m of the support set's batch-norm averages that normalise the "
        "queries (inductive policy): r <- (1 - m) r + m b after each support pass; 0: every "
        "pass weighted equally.",
        fallback=STATISTICS_MOMENTUM,
        recorded_before=0.0,
    )

    def check(self, run) -> None:
        super().check(run)
        # Resolved settings: the paper's values or the fallbacks.
        assert self.hidden_size is not None and self.inner_lr is not None
        assert self.gradient_clip is not None and self.statistics_momentum is not None
        require_positive(hidden_size=self.hidden_size)
        if not 0 < self.inner_lr < 1:
            raise ConfigError(
                f"for meta-lstm, `inner_lr` is the input gate's initial value and must lie in "
                f"(0, 1), got {self.inner_lr}."
            )
        if self.gradient_clip < 0:
            raise ConfigError(f"`gradient_clip` must be >= 0, got {self.gradient_clip}.")
        if not 0 <= self.statistics_momentum <= 1:
            raise ConfigError(
                f"`statistics_momentum` must lie in [0, 1], got {self.statistics_momentum}."
            )


def build(settings: MetaLSTMSettings, problem: Problem) -> MetaLSTM:
    # Resolved settings: the paper's values or the fallbacks.
    assert settings.hidden_size is not None and settings.inner_lr is not None
    assert settings.statistics_momentum is not None
    return MetaLSTM(
        problem.network(),
        hidden_size=settings.hidden_size,
        initial_step_size=settings.inner_lr,
        gradient_clip=settings.gradient_clip or None,
        statistics_momentum=settings.statistics_momentum,
        **settings.learner_arguments(problem),
    )


# Ravi & Larochelle, sec. 4 and their code: one episode per meta-update, T = 12 updates on the
# whole 5-way 1-shot support set (batch 5), the same at test, Adam at 1e-3, meta-gradient norm
# clipped to 0.25, input-gate bias in U(-5, -4). They report miniImageNet only; Omniglot and
# the sinusoid use the same meta-learner with MAML's episode shapes; for the sinusoid 10 steps,
# and Adam at 3e-4 for 1,000 iterations: at 1e-3 its inner loop diverged at iteration 460, at
# 3e-4 at 1,453 (docs/methods/meta-lstm.md).
register(
    Method(
        name="meta-lstm",
        algorithm=MetaLSTM,
        settings=MetaLSTMSettings,
        paper="Ravi & Larochelle 2017, Optimization as a Model for Few-Shot Learning (ICLR)",
        build=build,
        batch_norm="inductive",
        defaults={
            "sinusoid": {
                **FINN_2017["sinusoid"],
                "inner_lr": 0.01,
                "inner_steps": 10,
                "eval_inner_steps": 10,
                "outer_lr": 3e-4,
                "iterations": 1000,
                "val_every": 500,
            },
            "omniglot": dict(
                shots=1,
                queries=15,
                meta_batch=1,
                inner_lr=0.01,
                inner_steps=12,
                eval_inner_steps=12,
                outer_lr=1e-3,
                iterations=75000,
                val_every=1000,
            ),
        },
    )
)
