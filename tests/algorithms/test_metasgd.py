"""Meta-SGD: the meta-gradient of theta and of the learned step sizes, against float64 finite
differences, and the learned rates used coordinate by coordinate."""

import pytest
import torch
import torch.nn.functional as F

from fewshot import MetaSGD
from tests.algorithms.test_maml import finite_difference_gradient, sinusoid_like_tasks, small_mlp


def meta_sgd_with_distinct_rates(steps: int, vectorize: bool) -> MetaSGD:
    learner = MetaSGD(
        small_mlp(), inner_lr=0.1, inner_steps=steps, loss=F.mse_loss, vectorize=vectorize
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # rates that differ per coordinate, so a mix-up would show
        for rate in learner.rule.rates.values():
            rate.copy_(0.02 + 0.1 * torch.rand(rate.shape, generator=g))
    return learner


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("vectorize", [True, False])
def test_meta_gradient_of_weights_and_step_sizes_matches_finite_differences(steps, vectorize):
    learner = meta_sgd_with_distinct_rates(steps, vectorize)
    tasks = sinusoid_like_tasks()
    learner.meta_loss(tasks).backward()
    params = list(learner.parameters())
    assert len(params) == 2 * len(list(learner.model.parameters()))  # theta and alpha
    with torch.no_grad():
        expected = finite_difference_gradient(lambda: learner.meta_loss(tasks), params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-8)


def test_one_step_uses_each_coordinates_own_rate():
    learner = meta_sgd_with_distinct_rates(1, True)
    tasks = sinusoid_like_tasks()[:1]
    adapted = learner.adapt(tasks.support_x, tasks.support_y).params
    theta = dict(learner.model.named_parameters())
    grads = torch.autograd.grad(
        F.mse_loss(learner.model(tasks.support_x[0]), tasks.support_y[0]), list(theta.values())
    )
    for (name, p), g in zip(theta.items(), grads):
        torch.testing.assert_close(adapted[name][0], p - learner.rule.rate(name) * g)


def test_first_order_step_size_gradient_is_minus_support_times_query_gradient():
    """With one first-order step, dL_q(theta - alpha ⊙ g_s)/d alpha = -g_s ⊙ g_q, g_q taken
    at the adapted parameters; averaged over the tasks."""
    learner = meta_sgd_with_distinct_rates(1, True)
    learner.first_order = True
    tasks = sinusoid_like_tasks()
    learner.meta_loss(tasks).backward()
    names = [n for n, _ in learner.model.named_parameters()]
    expected = {n: 0 for n in names}
    for sx, sy, qx, qy in zip(*tasks.tensors()):
        theta = [p.detach().clone().requires_grad_() for p in learner.model.parameters()]
        call = lambda ps, x: torch.func.functional_call(learner.model, dict(zip(names, ps)), (x,))  # noqa: E731
        g_support = torch.autograd.grad(F.mse_loss(call(theta, sx), sy), theta)
        phi = [
            (t - learner.rule.rate(n).detach() * g).detach().requires_grad_()
            for n, t, g in zip(names, theta, g_support)
        ]
        g_query = torch.autograd.grad(F.mse_loss(call(phi, qx), qy), phi)
        for n, gs, gq in zip(names, g_support, g_query):
            expected[n] = expected[n] - gs * gq / len(tasks)
    for n in names:
        torch.testing.assert_close(learner.rule.rate(n).grad, expected[n])
