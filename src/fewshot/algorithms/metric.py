"""The metric-learning family: embed support and query examples, then score queries against
the support set (Prototypical, Matching and Relation Networks).

A subclass implements `score(support_z, support_y, query_z) -> logits`; embeddings keep the
encoder's shape (feature maps stay unflattened, for Relation Networks' relation module). A
method whose score reads the support set as a sequence (Matching Networks' full context
embeddings) says so with `reads_support_in_order`: each task's support set is then handed to it
in a random order, drawn once per training step or adaptation, so order carries no label
information and an adapted predictor gives the same answer on every call.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import (
    BATCH_NORM_LAYERS,
    Algorithm,
    Predictor,
    batch_norm_mode,
    check_batch_norm_policy,
    unchanged_buffers,
)
from fewshot.errors import ConfigError
from fewshot.tasks import Task


class MetricLearner(Algorithm):
    """Embed-then-score methods, trained with cross-entropy over the query logits.

    Args:
        encoder: the embedding network (a copy is trained, as `.encoder`).
        batch_norm: at prediction, "inductive" normalises with the running statistics learnt in
            training, so no query influences another; "transductive" normalises a task's support
            and queries together with their own batch statistics. In training the support and
            queries of a task always go through the encoder together, in one batch, apart
            from the other tasks of the meta-batch: batch norm never pools statistics across
            tasks, so a task's loss is the same alone or in any meta-batch. Prediction, under
            either policy and in either module mode, never changes the running statistics.
            The policy covers every batch-norm layer of the method (the encoder's, and a
            scoring module's, such as Relation Networks').
    """

    def __init__(self, encoder: nn.Module, batch_norm: str = "inductive") -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        self.batch_norm = check_batch_norm_policy(batch_norm)
        if batch_norm == "inductive" and _has_batch_norm_without_running_stats(self.encoder):
            raise ConfigError(
                "inductive batch norm needs running statistics, but the encoder has a "
                "batch-norm layer without them (track_running_stats=False); use "
                "batch_norm='transductive' or keep running statistics."
            )

    def score(
        self, support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor
    ) -> torch.Tensor:
        """Logits (tasks, queries, ways) from embeddings (tasks, n, *embedding_shape)."""
        raise NotImplementedError

    @property
    def reads_support_in_order(self) -> bool:
        """Whether `score` depends on the order of the support examples."""
        return False

    def support_order(self, support_y: torch.Tensor) -> torch.Tensor | None:
        """A random reading order of each task's support set, (tasks, n), from torch's
        generator, where the score depends on order; None where it does not."""
        if not self.reads_support_in_order:
            return None
        return torch.rand(support_y.shape[:2], device=support_y.device).argsort(dim=1)

    def ordered_score(self, support_z, support_y, query_z, order):
        """`score` with each task's support set read in `order` (None: as given)."""
        if order is not None:
            tasks = torch.arange(len(order), device=order.device).unsqueeze(1)
            support_z, support_y = support_z[tasks, order], support_y[tasks, order]
        return self.score(support_z, support_y, query_z)

    def meta_loss(self, tasks: Task) -> torch.Tensor:
        return self._loss_and_logits(tasks)[0]

    def training_step(self, tasks: Task) -> dict[str, float]:
        loss, logits = self._loss_and_logits(tasks)
        if torch.isfinite(loss):
            loss.backward()
        accuracy = (logits.detach().argmax(-1) == tasks.query_y).float().mean()
        return {"loss": loss.item(), "accuracy": accuracy.item()}

    def _loss_and_logits(self, tasks: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy and logits, each task's support and queries embedded together."""
        support_z, query_z = self.embed_each_task(tasks.support_x, tasks.query_x)
        order = self.support_order(tasks.support_y)
        logits = self.ordered_score(support_z, tasks.support_y, query_z, order)
        return self.query_loss(logits, tasks.query_y), logits

    def query_loss(self, logits: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """The training loss of the query scores (tasks, queries, ways): cross-entropy."""
        return F.cross_entropy(logits.flatten(0, 1), query_y.flatten())

    def adapt_tasks(self, support_x, support_y, inner_steps=None) -> Predictor:
        order = self.support_order(support_y)  # once: every call reads the support alike
        if self.is_transductive:

            def transductive(query_x):
                # batch statistics, without updating the running ones
                with batch_norm_mode(self, training=True), unchanged_buffers(self):
                    support_z, query_z = self.embed_each_task(support_x, query_x)
                    return self.ordered_score(support_z, support_y, query_z, order)

            return Predictor(transductive)
        with batch_norm_mode(self, training=False):
            support_z = self.embed(support_x)

        def inductive(query_x):
            with batch_norm_mode(self, training=False):
                return self.ordered_score(support_z, support_y, self.embed(query_x), order)

        return Predictor(inductive)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of (tasks, n, ...) inputs, shaped (tasks, n, *encoder_output_shape)."""
        return self.encoder(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    def embed_each_task(self, support_x, query_x):
        """Support and query embeddings, each task's support and queries in one pass of their
        own, so that batch norm in training mode normalises them together and apart from the
        other tasks."""
        n_support = support_x.shape[1]
        z = torch.cat(
            [
                self.embed(torch.cat([support_x[i : i + 1], query_x[i : i + 1]], dim=1))
                for i in range(len(support_x))
            ]
        )
        return z[:, :n_support], z[:, n_support:]


def _has_batch_norm_without_running_stats(module: nn.Module) -> bool:
    return any(
        isinstance(m, BATCH_NORM_LAYERS) and not m.track_running_stats for m in module.modules()
    )
