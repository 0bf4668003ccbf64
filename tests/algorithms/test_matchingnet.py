"""Matching Networks: the cosine attention and class probabilities by hand, the full context
embeddings' LSTMs by hand, and the shuffled order in which they read the support set."""

import math

import pytest
import torch
from torch import nn

from fewshot import MatchingNet, Task


def vector_task(seed=0, ways=3, shots=2, queries=2, d=4):
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots).unsqueeze(0)
    query_y = torch.arange(ways).repeat_interleave(queries).unsqueeze(0)
    return Task(
        torch.randn(1, ways * shots, d, generator=g),
        support_y,
        torch.randn(1, ways * queries, d, generator=g),
        query_y,
    )


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_attention_is_a_softmax_of_scaled_cosines_summed_per_class(scale):
    """P(y = k | x) = sum_{i: y_i = k} exp(s cos(x, x_i)) / sum_j exp(s cos(x, x_j)), by hand."""
    task = vector_task()
    log_p = MatchingNet(nn.Identity(), similarity_scale=scale).predict(task)[0]
    support, labels = task.support_x[0], task.support_y[0]
    for q, x in enumerate(task.query_x[0]):
        cosines = [float(x @ s / (x.norm() * s.norm())) for s in support]
        weights = [math.exp(scale * c) for c in cosines]
        for k in range(3):
            in_class = sum(w for w, y in zip(weights, labels) if y == k)
            assert log_p[q, k].exp().item() == pytest.approx(in_class / sum(weights), rel=1e-12)


def lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step from its equations: gates i, f, g, o in torch's weight order."""
    i, f, g, o = (w_ih @ x + b_ih + w_hh @ h + b_hh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_full_context_embeddings_follow_the_papers_equations():
    torch.manual_seed(0)
    d = 4
    net = MatchingNet(nn.Identity(), full_context=True, embedding_size=d, processing_steps=2)
    support = torch.randn(1, 5, d)
    query = torch.randn(1, 2, d)
    lstm = net.support_lstm
    forward = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]
    backward = [
        lstm.weight_ih_l0_reverse,
        lstm.weight_hh_l0_reverse,
        lstm.bias_ih_l0_reverse,
        lstm.bias_hh_l0_reverse,
    ]
    h_fwd, h_bwd = [], [None] * 5
    h = c = torch.zeros(d)
    for x in support[0]:
        h, c = lstm_step(x, h, c, *forward)
        h_fwd.append(h)
    h = c = torch.zeros(d)
    for i in reversed(range(5)):
        h, c = lstm_step(support[0, i], h, c, *backward)
        h_bwd[i] = h
    g = torch.stack([h_fwd[i] + h_bwd[i] + support[0, i] for i in range(5)])
    torch.testing.assert_close(net.contextual_support(support)[0], g.detach())

    cell = net.query_lstm
    weights = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    for q in range(2):
        f_prime = query[0, q]
        h, c = f_prime, torch.zeros(d)
        for _ in range(2):
            read = torch.softmax(g @ h, dim=0) @ g
            h, c = lstm_step(torch.cat([f_prime, read]), h, c, *weights)
            h = h + f_prime
        torch.testing.assert_close(net.contextual_queries(query, g.unsqueeze(0))[0, q], h.detach())


def orders_read(call) -> tuple[list[tuple], tuple]:
    """The support sets the LSTM read in four calls `call(net, task)`, one seed each, and the
    sampler's class-major order."""
    task = vector_task(shots=3)
    net = MatchingNet(nn.Identity(), full_context=True, embedding_size=4)
    seen = []
    net.support_lstm.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    for seed in range(4):
        torch.manual_seed(seed)
        call(net, task)
    rows = [tuple(map(tuple, s[0].tolist())) for s in seen]
    return rows, tuple(map(tuple, task.support_x[0].tolist()))


@pytest.mark.parametrize("call", [MatchingNet.predict, MatchingNet.training_step])
def test_the_lstm_reads_each_support_set_in_a_random_order(call):
    """In prediction and in training alike."""
    rows, class_major = orders_read(call)
    assert all(sorted(r) == sorted(class_major) for r in rows)  # a permutation of the set
    assert len(set(rows)) > 1 and any(r != class_major for r in rows)


def test_shuffling_keeps_each_example_with_its_label():
    """With all LSTM weights zero, the full context embeddings are the identity (g = g',
    f = f'), so the shuffled network must give the plain network's output exactly."""
    task = vector_task()
    net = MatchingNet(nn.Identity(), full_context=True, embedding_size=4, processing_steps=3)
    with torch.no_grad():
        for p in [*net.support_lstm.parameters(), *net.query_lstm.parameters()]:
            p.zero_()
    torch.testing.assert_close(net.predict(task), MatchingNet(nn.Identity()).predict(task))


def test_one_adapted_predictor_reads_the_support_set_in_one_order():
    """The order is drawn once per adaptation: repeated calls give the same probabilities
    exactly, and a query predicted alone gets what it gets among others."""
    torch.manual_seed(0)
    task = vector_task(shots=3, queries=3)
    net = MatchingNet(nn.Identity(), full_context=True, embedding_size=4).double().eval()
    support_x, query_x = task.support_x.double(), task.query_x.double()
    with torch.no_grad():
        predictor = net.adapt(support_x, task.support_y)
        first = predictor(query_x)
        assert torch.equal(predictor(query_x), first)
        for q in range(query_x.shape[1]):
            alone = predictor(query_x[:, q : q + 1])
            torch.testing.assert_close(alone[:, 0], first[:, q], rtol=1e-12, atol=1e-12)
        # another adaptation draws another order, and so (FCE) other probabilities
        assert not torch.equal(net.adapt(support_x, task.support_y)(query_x), first)


def test_inductive_prediction_keeps_each_query_independent_of_the_others():
    from fewshot.models import Conv4
    from tests.algorithms.test_maml import conv_tasks

    torch.manual_seed(0)
    encoder = Conv4(out_features=None, hidden=8, image_size=16, track_running_stats=True)
    net = MatchingNet(encoder, full_context=True, embedding_size=8)
    net.training_step(conv_tasks())
    net.eval()
    tasks = conv_tasks(seed=1)
    others = tasks.query_x.clone()
    others[:, 1:] = torch.randn(others[:, 1:].shape)
    torch.manual_seed(0)  # the same support-set order for both
    alone = net.predict(tasks)[:, 0]
    torch.manual_seed(0)
    changed = net.predict(Task(tasks.support_x, tasks.support_y, others, tasks.query_y))[:, 0]
    torch.testing.assert_close(alone, changed)
