"""Reptile's outer update against an independent computation with torch's own optimizers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import Reptile
from fewshot.training.loop import meta_step
from tests.algorithms.test_maml import linear_tasks, sinusoid_like_tasks, small_mlp


def independent_reptile_update(model, tasks, epsilon, steps, make_optimizer):
    """theta + epsilon * mean_i(phi_i - theta), each phi_i from `steps` full-batch steps of a
    fresh torch optimizer on all of task i's examples (support and query)."""
    theta = [p.detach().clone() for p in model.parameters()]
    differences = [torch.zeros_like(p) for p in theta]
    for sx, sy, qx, qy in zip(*tasks.tensors()):
        learner = copy.deepcopy(model)
        optimizer = make_optimizer(learner.parameters())
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
        for _ in range(steps):
            optimizer.zero_grad()
            F.mse_loss(learner(x), y).backward()
            optimizer.step()
        for d, phi, t in zip(differences, learner.parameters(), theta):
            d += (phi.detach() - t) / len(tasks)
    return [t + epsilon * d for t, d in zip(theta, differences)]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    ("inner_optimizer", "make_optimizer"),
    [
        ("sgd", lambda params: torch.optim.SGD(params, lr=0.05)),
        ("adam", lambda params: torch.optim.Adam(params, lr=0.05, betas=(0.0, 0.999))),
    ],
)
@pytest.mark.parametrize("vectorize", [True, False])
def test_outer_update_is_epsilon_times_the_mean_difference(
    inner_optimizer, make_optimizer, vectorize
):
    tasks = linear_tasks(num_tasks=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    reptile = Reptile(
        model,
        inner_lr=0.05,
        inner_steps=4,
        inner_optimizer=inner_optimizer,
        inner_batch=None,
        loss=F.mse_loss,
        vectorize=vectorize,
    )
    optimizer, schedule = reptile.configure_optimizers(lr=0.3, iterations=100)
    meta_step(reptile, optimizer, tasks, schedule)
    expected = independent_reptile_update(model, tasks, 0.3, 4, make_optimizer)
    for got, want in zip(reptile.model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


def test_epsilon_is_annealed_linearly_to_its_final_value():
    reptile = Reptile(small_mlp(), final_outer_lr=0.1, loss=F.mse_loss)
    optimizer, schedule = reptile.configure_optimizers(lr=1.0, iterations=10)
    rates = []
    for _ in range(11):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [1.0 - 0.9 * t / 10 for t in range(11)]
    assert rates == pytest.approx(expected, rel=1e-12)


def test_mini_batches_visit_every_example_once_per_epoch_in_a_new_order_each_epoch():
    """As the paper's code: batches of 3 from 6 examples, each pass over a task's examples in a
    fresh random order."""
    from fewshot.algorithms.gradient import _mini_batch, _random_order

    torch.manual_seed(0)
    x = torch.arange(2 * 6, dtype=torch.float64).view(2, 6, 1)
    y = x.squeeze(-1).clone()
    order = _random_order(x, batch=3, steps=20)
    batches = [_mini_batch(x, y, order, 3, step)[1] for step in range(20)]
    epochs = [torch.cat(batches[i : i + 2], dim=1) for i in range(0, 20, 2)]
    for epoch in epochs:
        assert torch.equal(epoch.sort(dim=1).values, y)  # every example exactly once
    assert len({tuple(epoch[0].tolist()) for epoch in epochs}) > 1  # reshuffled


def test_mini_batches_that_end_with_each_pass_cut_it_into_4_and_1_then_reshuffle():
    """Chen et al.'s fine-tuning: each pass over 5 examples is a batch of 4, then one of 1."""
    from fewshot.algorithms.gradient import _mini_batch, _random_order

    torch.manual_seed(0)
    x = torch.arange(2 * 5, dtype=torch.float64).view(2, 5, 1)
    y = x.squeeze(-1).clone()
    order = _random_order(x, batch=4, steps=20, whole_passes=True)
    batches = [_mini_batch(x, y, order, 4, step, whole_passes=True)[1] for step in range(20)]
    assert [b.shape[1] for b in batches] == [4, 1] * 10
    epochs = [torch.cat(batches[i : i + 2], dim=1) for i in range(0, 20, 2)]
    for epoch in epochs:
        assert torch.equal(epoch.sort(dim=1).values, y)  # every example exactly once
    assert len({tuple(epoch[0].tolist()) for epoch in epochs}) > 1  # reshuffled


def test_adapting_a_trained_reptile_uses_the_support_set_only():
    tasks = sinusoid_like_tasks()
    reptile = Reptile(small_mlp(), inner_optimizer="sgd", inner_lr=0.01, loss=F.mse_loss)
    changed = tasks.query_y + 100.0
    altered = type(tasks)(tasks.support_x, tasks.support_y, tasks.query_x, changed)
    torch.testing.assert_close(reptile.predict(tasks), reptile.predict(altered))


def test_adaptation_uses_the_whole_support_set_unless_an_eval_batch_is_given():
    tasks = sinusoid_like_tasks()
    kwargs = dict(inner_optimizer="sgd", inner_lr=0.01, loss=F.mse_loss, eval_inner_steps=3)
    whole = Reptile(small_mlp(), inner_batch=None, **kwargs).predict(tasks)
    torch.testing.assert_close(Reptile(small_mlp(), inner_batch=2, **kwargs).predict(tasks), whole)
    batched = Reptile(small_mlp(), inner_batch=None, eval_inner_batch=2, **kwargs).predict(tasks)
    assert not torch.allclose(batched, whole)
