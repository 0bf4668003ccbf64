"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016).

A query x is labelled by attention over the support set: with c the cosine similarity and s
the similarity scale,

    a(x, x_i) = exp(s c(f(x), g(x_i))) / sum_j exp(s c(f(x), g(x_j))),
    P(y = k | x, S) = sum_{i: y_i = k} a(x, x_i).

The paper has s = 1. A cosine lies in [-1, 1], so with s = 1 the attention over n support
examples stays close to uniform (at most e^2 between two weights), and a class's probability
follows how many support examples it has more than how close they are; Chen et al. 2019's
reimplementation scales it by 100 for that reason (after a ReLU). `similarity_scale` sets s.

Without full context embeddings f = g = the encoder. With them (FCE), g reads the whole
support set with a bidirectional LSTM, g(x_i) = h_fwd_i + h_bwd_i + g'(x_i), and f attends to
g(S) for K processing steps with an LSTM,

    h_k, c_k = LSTM([f'(x), r_{k-1}], (h_{k-1}, c_{k-1})),  h_k <- h_k + f'(x),
    r_k = sum_i softmax_i(h_k . g(x_i)) g(x_i),           f(x) = h_K,

starting from h_0 = f'(x), c_0 = 0, r_0 = the read of h_0. An LSTM reads the support set as a
sequence, so each task's support set is read in a random order, not the sampler's class-major
one: order must carry no label information. The order is drawn once per adaptation
(`MetricLearner.reads_support_in_order`), so an adapted predictor answers a query the same way
on every call and whatever other queries come with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.metric import MetricLearner
from fewshot.algorithms.registry import Method, Problem, Settings, register, setting
from fewshot.errors import ConfigError, require_positive
from fewshot.models import FeaturesAndHead

# s by default: chosen by measurement on the validation classes (docs/methods/matchingnet.md).
MATCHING_SCALE = 100.0


class MatchingNet(MetricLearner):
    """Matching Networks around an embedding network `encoder` (embeddings are flattened).

    Args:
        encoder: f' = g', the embedding network.
        full_context: add the full context embeddings (needs `embedding_size`, the encoder's
            output size).
        processing_steps: K, the attention LSTM's reads; None: the support set's size, as in
            Chen et al.'s reimplementation (the paper does not give K for its experiments).
        similarity_scale: s, the factor of the cosine similarities before the softmax.
    """

    def __init__(
        self,
        encoder: nn.Module,
        full_context: bool = False,
        embedding_size: int | None = None,
        processing_steps: int | None = None,
        batch_norm: str = "inductive",
        similarity_scale: float = MATCHING_SCALE,
    ) -> None:
        super().__init__(encoder, batch_norm)
        self.full_context = full_context
        self.processing_steps = processing_steps
        self.similarity_scale = similarity_scale
        require_positive(similarity_scale=similarity_scale)
        if processing_steps is not None:
            require_positive(processing_steps=processing_steps)
        if full_context:
            if embedding_size is None:
                raise ValueError("full_context needs embedding_size, the encoder's output size")
            d = embedding_size
            self.support_lstm = nn.LSTM(d, d, batch_first=True, bidirectional=True)
            self.query_lstm = nn.LSTMCell(2 * d, d)

    @property
    def reads_support_in_order(self) -> bool:
        """True with full context embeddings: their LSTM reads the support set as a
        sequence, so the score depends on its order."""
        return self.full_context

    def score(self, support_z, support_y, query_z):
        support, query = support_z.flatten(2), query_z.flatten(2)
        if self.full_context:
            support = self.contextual_support(support)
            query = self.contextual_queries(query, support)
        return attention_log_probabilities(query, support, support_y, self.similarity_scale)

    def contextual_support(self, support: torch.Tensor) -> torch.Tensor:
        """g(x_i) = h_fwd_i + h_bwd_i + g'(x_i): (tasks, n, d) in the order given."""
        outputs, _ = self.support_lstm(support)
        forward, backward = outputs.chunk(2, dim=-1)
        return forward + backward + support

    def contextual_queries(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """f(x) = h_K of the attention LSTM over g(S): (tasks, q, d)."""
        tasks, q, d = query.shape
        steps = self.processing_steps or support.shape[1]
        h, c = query, torch.zeros_like(query)
        for _ in range(steps):
            attention = F.softmax(h @ support.transpose(1, 2), dim=-1)
            read = attention @ support
            h, c = self.query_lstm(
                torch.cat([query, read], dim=-1).flatten(0, 1), (h.flatten(0, 1), c.flatten(0, 1))
            )
            h, c = h.view(tasks, q, d) + query, c.view(tasks, q, d)
        return h


def attention_log_probabilities(
    query: torch.Tensor, support: torch.Tensor, support_y: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """log P(y = k | x, S) for every query: log sum_{i: y_i = k} a(x, x_i), (tasks, q, ways),
    with the attention a a softmax of `scale` times the cosine similarities.

    Computed as logsumexp over each class's scaled similarities minus logsumexp over all, which
    is the log of the attention mass without forming it (no log of an underflowed zero).
    """
    cosine = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)
    cosine = cosine * scale
    ways = int(support_y.max()) + 1
    in_class = F.one_hot(support_y, ways).to(cosine.dtype).transpose(1, 2)  # (tasks, ways, n)
    masked = cosine.unsqueeze(2) + torch.log(in_class).unsqueeze(1)  # -inf outside the class
    return masked.logsumexp(-1) - cosine.logsumexp(-1, keepdim=True)


@dataclass
class MatchingNetSettings(Settings):
    full_context: bool | None = setting(
        "Full context embeddings: a bidirectional LSTM over the support set and an attention "
        "LSTM over each query.",
        fallback=False,
    )
    processing_steps: int | None = setting(
        "Reads of the attention LSTM (full context embeddings).",
        default_text="the support set's size",
    )
    similarity_scale: float | None = setting(
        "s, the factor of the cosine similarities before the attention's softmax (the paper: "
        "1; Chen et al.'s reimplementation: 100).",
        fallback=MATCHING_SCALE,
        recorded_before=1.0,
    )

    def check(self, run) -> None:
        super().check(run)
        # Resolved settings: the paper's values or the fallbacks.
        assert self.similarity_scale is not None
        require_positive(similarity_scale=self.similarity_scale)
        if not math.isfinite(self.similarity_scale):
            raise ConfigError(f"similarity_scale must be finite, got {self.similarity_scale}.")


def build(settings: MatchingNetSettings, problem: Problem) -> MatchingNet:
    encoder = cast(FeaturesAndHead, problem.network(head=False, track_running_stats=True))
    # Resolved settings: the paper's values or the fallbacks.
    assert settings.full_context is not None and settings.batch_norm is not None
    assert settings.similarity_scale is not None
    return MatchingNet(
        encoder,
        full_context=settings.full_context,
        embedding_size=encoder.embedding_size,
        processing_steps=settings.processing_steps,
        batch_norm=settings.batch_norm,
        similarity_scale=settings.similarity_scale,
    )


# Vinyals et al. 2016 train on episodes of the test shape; their Omniglot results use no full
# context embeddings (their FCE column says N; miniImageNet's use them). The optimizer, queries
# and length are Chen et al. 2019's reimplementation (Adam 1e-3, one episode an update, 16
# queries per class for 5 ways), which evaluates with running statistics (model.eval()).
register(
    Method(
        name="matchingnet",
        algorithm=MatchingNet,
        settings=MatchingNetSettings,
        paper="Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016, Matching Networks for "
        "One Shot Learning (NeurIPS)",
        build=build,
        batch_norm="inductive",
        defaults={
            "omniglot": dict(
                full_context=False,
                shots=1,
                queries=15,
                train_queries=16,
                meta_batch=1,
                outer_lr=1e-3,
                iterations=60000,
                val_every=1000,
            ),
        },
    )
)
