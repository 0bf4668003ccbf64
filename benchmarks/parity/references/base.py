"""The interface a parity reference implements, so that the harness can train it on fewshot's
episodes and fewshot's evaluator can score it.

A reference is an independent implementation of a method (another library, a paper's code, a
transcription of a paper's algorithm). It may use fewshot's samplers, its `fewshot.models`
networks and its evaluator, never `fewshot.algorithms`.
"""

from __future__ import annotations

import torch

from fewshot.tasks import Batch, Task


class Reference(torch.nn.Module):
    """One reference implementation of one method, holding its own network and optimizer.

    The harness calls `train_step` once per training iteration with exactly the meta-batch
    fewshot's loop draws (a `Task` meta-batch, or a `Batch` of examples for methods trained on
    ordinary batches), and fewshot's `evaluate_episodes` calls `predict` in eval mode under
    `torch.no_grad()` (a reference that needs gradients to adapt enables them itself with
    `torch.enable_grad()`). `state_dict()` must hold everything `predict` depends on, so that
    the harness can keep the best-validated weights.
    """

    source: str = ""  # e.g. "learn2learn 0.2.0, learn2learn/algorithms/maml.py"
    is_transductive: bool = False  # whether a query's prediction depends on the other queries

    def train_step(self, tasks: Task | Batch) -> float:
        """One outer update on a meta-batch; returns its loss."""
        raise NotImplementedError

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        """Logits (tasks, queries, ways) for the query sets after adapting on the support sets;
        `inner_steps` (None: the reference's own) is what fewshot's evaluator passes."""
        raise NotImplementedError
