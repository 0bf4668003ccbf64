"""Prototypical Networks against a hand-worked case and float64 finite differences."""

import pytest
import torch
from torch import nn

from fewshot import ProtoNet, Task
from fewshot.algorithms.protonet import class_means, squared_distances
from fewshot.errors import DataError


def test_hand_worked_two_way_episode():
    # Identity embedding in 2-D: class 0 support at (0,0) and (2,0) -> prototype (1,0);
    # class 1 support at (0,4) -> prototype (0,4). Query (1,1): distances 1 and 10.
    support_x = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]])
    support_y = torch.tensor([[0, 0, 1]])
    query_x = torch.tensor([[[1.0, 1.0], [0.0, 3.0]]])
    query_y = torch.tensor([[0, 1]])
    logits = ProtoNet(nn.Identity()).predict(Task(support_x, support_y, query_x, query_y))
    torch.testing.assert_close(logits, torch.tensor([[[-1.0, -10.0], [-10.0, -1.0]]]))
    loss = ProtoNet(nn.Identity()).meta_loss(Task(support_x, support_y, query_x, query_y))
    expected = -torch.log_softmax(torch.tensor([-1.0, -10.0]), 0)[0]
    torch.testing.assert_close(loss, expected)


def test_class_means_and_distances_match_loops():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 8, 5, generator=g)
    labels = torch.stack([torch.randperm(8, generator=g) % 4 for _ in range(3)])
    q = torch.randn(3, 6, 5, generator=g)
    means = class_means(z, labels)
    for t in range(3):
        for k in range(4):
            torch.testing.assert_close(means[t, k], z[t][labels[t] == k].mean(0))
            for i in range(6):
                expected = ((q[t, i] - means[t, k]) ** 2).sum()
                torch.testing.assert_close(squared_distances(q, means)[t, i, k], expected)


@pytest.mark.usefixtures("float64")
def test_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    encoder = nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(1)
    tasks = Task(
        torch.randn(2, 4, 3, generator=g, dtype=torch.float64),
        torch.tensor([[0, 0, 1, 1]] * 2),
        torch.randn(2, 6, 3, generator=g, dtype=torch.float64),
        torch.tensor([[0, 1, 0, 1, 0, 1]] * 2),
    )
    net = ProtoNet(encoder)
    net.meta_loss(tasks).backward()
    eps = 1e-6
    for p in net.encoder.parameters():
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            plus = net.meta_loss(tasks).item()
            flat[i] = original - eps
            minus = net.meta_loss(tasks).item()
            flat[i] = original
            assert abs(p.grad.view(-1)[i] - (plus - minus) / (2 * eps)) < 1e-7


def test_a_class_missing_from_a_support_set_is_refused_not_a_nan_prototype():
    embeddings = torch.ones(2, 3, 4)
    labels = torch.tensor([[0, 1, 2], [0, 2, 2]])  # task 1 lacks class 1
    with pytest.raises(DataError, match="class 1 has no support example in task 1"):
        class_means(embeddings, labels)
