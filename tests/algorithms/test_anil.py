"""ANIL: only the head adapts; the body's outer gradient against an independent computation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import ANIL
from tests.algorithms.test_maml import sinusoid_like_tasks


def body_and_head(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 1)


def independent_anil_gradient(body, head, tasks, alpha, steps):
    """ANIL written out with plain autograd, task by task: features from the body, then
    `steps` gradient steps on the head's weight and bias, then the query loss."""
    params = list(body.parameters()) + list(head.parameters())
    total = 0
    for sx, sy, qx, qy in zip(*tasks.tensors()):
        w, b = head.weight, head.bias
        for _ in range(steps):
            loss = F.mse_loss(body(sx) @ w.T + b, sy)
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
            w, b = w - alpha * gw, b - alpha * gb
        total = total + F.mse_loss(body(qx) @ w.T + b, qy) / len(tasks)
    return torch.autograd.grad(total, params)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_equals_an_independent_computation(vectorize, steps):
    body, head = body_and_head()
    anil = ANIL(body, head, inner_lr=0.3, inner_steps=steps, loss=F.mse_loss, vectorize=vectorize)
    tasks = sinusoid_like_tasks()
    anil.meta_loss(tasks).backward()
    expected = independent_anil_gradient(body, head, tasks, 0.3, steps)
    got = [p.grad for p in list(anil.encoder.parameters()) + list(anil.model.parameters())]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in got[:4])  # the body learns in the outer loop


def test_only_the_head_adapts():
    body, head = body_and_head()
    anil = ANIL(body, head, inner_lr=0.3, inner_steps=2, loss=F.mse_loss)
    tasks = sinusoid_like_tasks()
    path = anil.trajectory(tasks.support_x, tasks.support_y, steps=2)
    assert set(path.params[-1]) == {"weight", "bias"}  # the inner loop holds the head alone
    assert not torch.equal(path.params[-1]["weight"][0], anil.model.weight)
    body_before = [p.clone() for p in anil.encoder.parameters()]
    anil.predict(tasks)
    assert all(torch.equal(a, b) for a, b in zip(body_before, anil.encoder.parameters()))
