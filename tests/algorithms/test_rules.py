"""The inner update rules inside second-order meta-gradients, against float64 finite
differences and against each other on both execution paths."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import GradientLearner
from fewshot.algorithms.rules import Adam, PerLayerPerStepSGD
from tests.algorithms.test_maml import finite_difference_gradient, sinusoid_like_tasks, small_mlp


def relu_mlp_with_a_dead_unit(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():  # unit 0 never fires: its inner gradients are exactly zero
        model[0].weight[0] = 0.0
        model[0].bias[0] = -1.0
    return model


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("vectorize", [True, False])
def test_second_order_through_adam_matches_finite_differences_even_at_zero_gradients(vectorize):
    learner = GradientLearner(
        relu_mlp_with_a_dead_unit(),
        Adam(0.05, betas=(0.5, 0.9)),
        inner_steps=2,
        loss=F.mse_loss,
        vectorize=vectorize,
    )
    tasks = sinusoid_like_tasks()
    learner.meta_loss(tasks).backward()
    params = list(learner.parameters())
    assert all(torch.isfinite(p.grad).all() for p in params)
    with torch.no_grad():
        expected = finite_difference_gradient(lambda: learner.meta_loss(tasks), params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("vectorize", [True, False])
def test_per_layer_per_step_rates_get_the_finite_difference_meta_gradient(vectorize):
    def make_rule(params):
        rule = PerLayerPerStepSGD(params, steps=2, lr=0.05)
        with torch.no_grad():
            for i, rates in enumerate(rule.rates.values()):
                rates.copy_(torch.tensor([0.03 + 0.01 * i, 0.08 - 0.01 * i]))
        return rule

    learner = GradientLearner(
        small_mlp(), make_rule, inner_steps=2, loss=F.mse_loss, vectorize=vectorize
    )
    tasks = sinusoid_like_tasks()
    learner.meta_loss(tasks).backward()
    params = list(learner.parameters())
    assert len(list(learner.rule.parameters())) == len(list(learner.model.parameters()))
    with torch.no_grad():
        expected = finite_difference_gradient(lambda: learner.meta_loss(tasks), params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-8)


def test_per_layer_per_step_rates_index_the_step_and_reuse_the_last_beyond_it():
    rule = PerLayerPerStepSGD({"w": torch.zeros(2)}, steps=2, lr=0.1)
    with torch.no_grad():
        rule.rates["w"].copy_(torch.tensor([1.0, 2.0]))
    w, g = torch.ones(1, 2), torch.full((1, 2), 0.5)
    for step, rate in [(0, 1.0), (1, 2.0), (5, 2.0)]:
        new, _ = rule({"w": w}, {"w": g}, torch.zeros(1), None, step)
        torch.testing.assert_close(new["w"], w - rate * g)


@pytest.mark.parametrize(
    "momentum, dampening, weight_decay", [(0.0, 0.0, 0.0), (0.9, 0.9, 1e-3), (0.5, 0.0, 0.1)]
)
def test_momentum_sgd_follows_torch_optim_sgd_step_for_step(momentum, dampening, weight_decay):
    """The fine-tuning rule against torch's own optimizer on the same gradients."""
    from fewshot.algorithms.rules import MomentumSGD

    torch.manual_seed(0)
    start = torch.randn(2, 3)
    reference = start.clone().requires_grad_()
    optimizer = torch.optim.SGD(
        [reference], lr=0.1, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    rule = MomentumSGD(0.1, momentum, dampening, weight_decay)
    params, state = {"w": start.clone()}, rule.init_state({"w": start})
    for step in range(4):
        grad = torch.randn(2, 3)
        reference.grad = grad.clone()
        optimizer.step()
        params, state = rule(params, {"w": grad}, torch.zeros(1), state, step)
        torch.testing.assert_close(params["w"], reference.detach())


def test_adam_s_square_root_is_the_same_with_and_without_a_graph_through_it():
    """The plain sqrt taken where nothing differentiates through v gives, bit for bit, what the
    zero-gradient-at-zero form gives where something does."""
    from fewshot.algorithms.rules import _sqrt_with_zero_gradient_at_zero

    v = torch.rand(1000, dtype=torch.float64) * (torch.rand(1000) > 0.3)
    leaf = v.clone().requires_grad_()
    graphed = _sqrt_with_zero_gradient_at_zero(leaf)
    assert (v == 0).any()
    assert torch.equal(_sqrt_with_zero_gradient_at_zero(v), graphed.detach())
    (gradient,) = torch.autograd.grad(graphed.sum(), leaf)
    assert torch.isfinite(gradient).all() and (gradient[v == 0] == 0).all()


@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.5, 0.9)])
def test_adam_follows_torch_optim_adam_step_for_step(betas):
    """The inner Adam against torch's own optimizer on the same gradients, some coordinates'
    exactly zero (Adam's denominator is then eps alone)."""
    torch.manual_seed(0)
    start = torch.randn(2, 3)
    reference = start.clone().requires_grad_()
    optimizer = torch.optim.Adam([reference], lr=0.05, betas=betas)
    rule = Adam(0.05, betas=betas)
    params, state = {"w": start.clone()}, rule.init_state({"w": start})
    for step in range(4):
        grad = torch.randn(2, 3) * (torch.rand(2, 3) > 0.3)
        reference.grad = grad.clone()
        optimizer.step()
        params, state = rule(params, {"w": grad}, torch.zeros(1), state, step)
        torch.testing.assert_close(params["w"], reference.detach(), rtol=0, atol=1e-7)
