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
from dataclasses import dataclass

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
from fewshot.datasets.transforms import ImageTransform, parse_augment
from fewshot.errors import ConfigError, require_positive
from fewshot.tasks import Task


@dataclass(frozen=True)
class SupportFineTuning:
    """F of Hu et al. 2022's pretrain, meta-train, fine-tune (P>M>F): before predicting an
    episode, fine-tune the encoder of a copy of the method on its support set.

    Each of `steps` Adam steps (learning rate `lr`) scores a pseudo-episode, the support set
    as support and an augmentation of it (`augment`: "crop" random shifts, "flip") as queries
    with the support's labels, and minimises the method's own loss on it. The queries are
    never seen, so it is inductive; the trained method is never changed, so every episode
    starts from it. Its random draws come from torch's generator (the evaluation seed's).
    """

    steps: int
    lr: float
    augment: str = "crop"

    def __post_init__(self) -> None:
        require_positive(finetune_steps=self.steps, finetune_lr=self.lr)
        parse_augment(self.augment, "finetune_augment")


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

    # F of P>M>F, set for evaluation (`set_support_fine_tuning`); None: predict as trained.
    support_fine_tuning: SupportFineTuning | None = None

    def set_support_fine_tuning(self, fine_tuning: SupportFineTuning | None) -> None:
        if fine_tuning is not None and not any(p.requires_grad for p in self.encoder.parameters()):
            raise ConfigError(
                "`finetune_steps`: the encoder is frozen whole, with nothing to fine-tune."
            )
        self.support_fine_tuning = fine_tuning

    def adapt_tasks(self, support_x, support_y, inner_steps=None) -> Predictor:
        if self.support_fine_tuning is not None:
            return self._fine_tuned_predictor(support_x, support_y, self.support_fine_tuning)
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

    def _fine_tuned_predictor(
        self, support_x, support_y, fine_tuning: SupportFineTuning
    ) -> Predictor:
        """Each task predicted by its own copy of the method, fine-tuned on its support set."""
        predictors = []
        for task in range(len(support_x)):
            x, y = support_x[task : task + 1], support_y[task : task + 1]
            tuned = copy.deepcopy(self)
            tuned.support_fine_tuning = None
            fine_tune_on_support(tuned, x, y, fine_tuning)
            predictors.append(tuned.adapt_tasks(x, y))
        return Predictor(
            lambda query_x: torch.cat([p(query_x[i : i + 1]) for i, p in enumerate(predictors)])
        )

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


def fine_tune_on_support(
    method: MetricLearner, x: torch.Tensor, y: torch.Tensor, fine_tuning: SupportFineTuning
) -> None:
    """Fine-tune `method`'s encoder in place on one task's support set (x, y), shaped
    (1, n, ...), as `SupportFineTuning` says. Batch norm keeps its policy's statistics: the
    running ones (inductive), or each pseudo-episode's (transductive); none is updated."""
    augment = parse_augment(fine_tuning.augment, "finetune_augment")
    if augment and x.dim() != 5:
        raise ConfigError(
            "`finetune_augment` augments images; give `finetune_augment=` for other data."
        )
    transform = ImageTransform(augment=augment)
    # drawn from torch's generator: one number per episode, so the draws follow the seed
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    learned = [p for p in method.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(learned, lr=fine_tuning.lr)
    order = method.support_order(y)
    with (
        torch.enable_grad(),
        batch_norm_mode(method, training=method.is_transductive),
        unchanged_buffers(method),
    ):
        for _ in range(fine_tuning.steps):
            pseudo_queries = transform(x.cpu(), generator).to(x.device) if augment else x
            support_z, query_z = method.embed_each_task(x, pseudo_queries)
            loss = method.query_loss(method.ordered_score(support_z, y, query_z, order), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _has_batch_norm_without_running_stats(module: nn.Module) -> bool:
    return any(
        isinstance(m, BATCH_NORM_LAYERS) and not m.track_running_stats for m in module.modules()
    )
