"""Prediction with a trained gradient learner: the adapted parameters' outputs on query sets,
in the learner's batch-norm mode."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fewshot.algorithms.base import Predictor
from fewshot.algorithms.gradient.parallel import per_task_buffers
from fewshot.algorithms.rules import Params

if TYPE_CHECKING:
    from fewshot.algorithms.gradient.learner import GradientLearner


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
        if not self.learner.predicts_one_query_at_a_time:
            with per_task_buffers(self.buffers):
                return self.learner.query_outputs(
                    self.params, query_x, self.steps, self.encoder_params
                )
        return self._one_query_at_a_time(query_x)

    def _one_query_at_a_time(self, query_x: torch.Tensor) -> torch.Tensor:
        """Inductive batch norm: each query is normalised with its task's support set plus
        itself, so no query sees another (Nichol et al. 2018)."""
        # Task by task, all queries of a task at once: (queries, support + 1, ...) with the
        # task's parameters repeated.
        outputs = []
        for i in range(len(query_x)):
            queries = query_x[i]
            support = self.support_x[i].expand(len(queries), *self.support_x.shape[1:])
            batches = torch.cat([support, queries.unsqueeze(1)], dim=1)
            params = {n: p[i].expand(len(queries), *p.shape[1:]) for n, p in self.params.items()}
            out = self.learner.query_outputs(params, batches, self.steps, self.encoder_params)
            outputs.append(out[:, -1])
        return torch.stack(outputs)
