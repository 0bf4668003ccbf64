"""MAML++: each of the paper's fixes against an independent computation, and MAML++ with every
fix off against MAML."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import MAML, MAMLpp, Task
from fewshot.algorithms.batchnorm import PerStepBatchNorm
from fewshot.algorithms.gradient import inner_step
from fewshot.algorithms.mamlpp import msl_weights
from tests.algorithms.test_maml import finite_difference_gradient, sinusoid_like_tasks, small_mlp

ALL_OFF = dict(msl=False, da=False, bnwb=False, bnrs=False, lslr=False, ca=False)


def small_batch_norm_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))


def classification_tasks(num_tasks=3, seed=2) -> Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tasks, 10, 3, generator=g)
    y = torch.arange(2).repeat(num_tasks, 5)
    return Task(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])


# -- MSL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("msl_epochs", [10, 50])
def test_msl_weights_sum_to_one_and_follow_the_papers_schedule(steps, msl_epochs):
    for epoch in range(msl_epochs + 3):
        weights = msl_weights(steps, epoch, msl_epochs)
        assert len(weights) == steps
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)
        if epoch >= msl_epochs:
            assert weights == [0.0] * (steps - 1) + [1.0]
            continue
        # Linear decay of the earlier steps by 1/(S * msl_epochs) a epoch, floored at 0.03 / S.
        expected_earlier = max(1 / steps - epoch / (steps * msl_epochs), 0.03 / steps)
        assert weights[:-1] == pytest.approx([expected_earlier] * (steps - 1))
    assert msl_weights(steps, 0, msl_epochs) == pytest.approx([1 / steps] * steps)
    if steps > 1 and msl_epochs == 50:  # 1/50 < 0.03: the floor is reached before the end
        assert msl_weights(steps, 49, 50)[0] == pytest.approx(0.03 / steps)


def test_msl_meta_loss_is_the_weighted_sum_of_the_query_losses_after_each_step():
    learner = MAMLpp(
        small_mlp(),
        inner_lr=0.1,
        inner_steps=3,
        loss=F.mse_loss,
        **{**ALL_OFF, "msl": True, "msl_epochs": 4, "iterations_per_epoch": 1},
    )
    learner.iterations_done.fill_(2)
    tasks = sinusoid_like_tasks()
    path = learner.trajectory(tasks.support_x, tasks.support_y, 3, keep_all_steps=True)
    per_step = [
        F.mse_loss(
            torch.func.vmap(torch.func.functional_call, (None, 0, 0))(
                learner.model, params, tasks.query_x
            ),
            tasks.query_y,
        )
        for params in path.params[1:]
    ]
    expected = sum(w * loss for w, loss in zip(msl_weights(3, 2, 4), per_step))
    torch.testing.assert_close(learner.meta_loss(tasks), expected)


# -- every switch off is MAML -----------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False])
def test_with_every_switch_off_the_meta_gradient_is_mamls(vectorize):
    tasks = classification_tasks()
    grads = []
    for algorithm in (MAML, lambda m, **kw: MAMLpp(m, **kw, **ALL_OFF)):
        learner = algorithm(
            small_batch_norm_net(), inner_lr=0.3, inner_steps=2, vectorize=vectorize
        )
        learner.training_step(tasks)
        grads.append({n: p.grad for n, p in learner.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0)


# -- LSLR -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("vectorize", [True, False])
def test_lslr_meta_gradient_of_weights_and_rates_matches_finite_differences(vectorize):
    learner = MAMLpp(
        small_mlp(),
        inner_lr=0.1,
        inner_steps=2,
        loss=F.mse_loss,
        vectorize=vectorize,
        **{**ALL_OFF, "lslr": True, "msl": True},
    )
    with torch.no_grad():  # rates that differ per layer and step, so a mix-up would show
        for i, rate in enumerate(learner.rule.rates.values()):
            rate.copy_(torch.tensor([0.05 + 0.01 * i, 0.12 - 0.01 * i]))
    tasks = sinusoid_like_tasks()
    learner.meta_loss(tasks).backward()
    params = list(learner.parameters())
    assert len(learner.rule.rates) == len(list(learner.model.parameters()))
    with torch.no_grad():
        expected = finite_difference_gradient(lambda: learner.meta_loss(tasks), params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-8)


# -- BNWB and BNRS --------------------------------------------------------------------------


def outputs_at_every_step(learner: MAMLpp, x: torch.Tensor) -> list[torch.Tensor]:
    params = learner._initial_params(len(x), differentiable=False)
    outputs = []
    for step in range(learner.inner_steps):
        with inner_step(step):
            outputs.append(learner._call_model(params, x))
    return outputs


@pytest.mark.parametrize("perturbed", [0, 1, 2])
def test_step_s_uses_step_s_batch_norm_weights_and_biases(perturbed):
    learner = MAMLpp(small_batch_norm_net(), inner_steps=3, **{**ALL_OFF, "bnwb": True})
    layer = learner.model[1]
    assert isinstance(layer, PerStepBatchNorm) and layer.weight.shape == (3, 6)
    x = classification_tasks().support_x
    before = outputs_at_every_step(learner, x)
    with torch.no_grad():
        layer.weight[perturbed] += 0.5
        layer.bias[perturbed] -= 0.25
    after = outputs_at_every_step(learner, x)
    for step in range(3):
        assert torch.equal(before[step], after[step]) == (step != perturbed)


@pytest.mark.parametrize("perturbed", [0, 1, 2])
def test_a_layer_normalising_with_running_statistics_reads_step_s_row(perturbed):
    learner = MAMLpp(small_batch_norm_net(), inner_steps=3, **{**ALL_OFF, "bnrs": True})
    layer = learner.model[1]
    layer.use_running_statistics = True
    x = classification_tasks().support_x
    before = outputs_at_every_step(learner, x)
    with torch.no_grad():
        layer.running_mean[perturbed] += 0.5
    after = outputs_at_every_step(learner, x)
    for step in range(3):
        assert torch.equal(before[step], after[step]) == (step != perturbed)


@pytest.mark.parametrize("vectorize", [True, False])
def test_running_statistics_move_towards_the_tasks_mean_batch_statistics(vectorize):
    """One inner step: the support pass (step 0) and then the query pass (after step 1, index 0)
    each move row 0 by momentum 0.1 towards the mean over tasks of their batch statistics."""
    learner = MAMLpp(
        small_batch_norm_net(), inner_steps=1, vectorize=vectorize, **{**ALL_OFF, "bnrs": True}
    )
    tasks = classification_tasks()
    linear = learner.model[0]
    phi = learner.trajectory(tasks.support_x, tasks.support_y, 1, differentiable=False)
    adapted = phi.params[-1]
    learner.training_step(tasks)
    with torch.no_grad():
        support = linear(tasks.support_x)  # step 0 runs with theta
        query = torch.stack(
            [
                F.linear(tasks.query_x[i], adapted["0.weight"][i], adapted["0.bias"][i])
                for i in range(len(tasks))
            ]
        )
    mean, var = torch.zeros(6), torch.ones(6)
    for h in (support, query):
        mean = 0.9 * mean + 0.1 * h.mean(1).mean(0)
        var = 0.9 * var + 0.1 * h.var(1, correction=1).mean(0)
    layer = learner.model[1]
    torch.testing.assert_close(layer.running_mean[0], mean)
    torch.testing.assert_close(layer.running_var[0], var)


def test_bnwb_weights_are_meta_learned_per_step_but_not_adapted():
    learner = MAMLpp(small_batch_norm_net(), inner_steps=2, **{**ALL_OFF, "bnwb": True})
    assert "1.weight" not in learner.adapted_names and "1.weight" in learner.meta_learned_names
    learner.training_step(classification_tasks())
    grad = learner.model[1].weight.grad
    assert grad.shape == (2, 6) and bool((grad[0] != 0).any()) and bool((grad[1] != 0).any())


# -- DA and CA ------------------------------------------------------------------------------


def test_derivative_order_annealing_switches_to_second_order_at_the_named_iteration():
    tasks = classification_tasks()
    options = dict(inner_lr=0.3, inner_steps=2, iterations_per_epoch=3)
    learner = MAMLpp(small_batch_norm_net(), **options, **{**ALL_OFF, "da": True, "da_epochs": 2})
    references = {
        order: MAMLpp(small_batch_norm_net(), **options, **ALL_OFF, first_order=order)
        for order in (True, False)
    }
    expected = {}
    for order, reference in references.items():
        reference.training_step(tasks)
        expected[order] = [p.grad for p in reference.parameters()]
    assert not torch.equal(expected[True][0], expected[False][0])  # the orders differ here
    for iteration in range(8):
        learner.zero_grad()
        learner.training_step(tasks)
        first_order = iteration < 6  # 2 epochs of 3 iterations
        for (name, p), q in zip(learner.named_parameters(), expected[first_order]):
            torch.testing.assert_close(p.grad, q, rtol=0, atol=0, msg=name)


def test_cosine_annealing_reaches_the_minimum_outer_rate_at_the_last_iteration():
    learner = MAMLpp(small_mlp(), loss=F.mse_loss, min_outer_lr=1e-5)
    optimizer, schedule = learner.configure_optimizers(1e-3, iterations=100)
    rates = []
    for _ in range(100):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[49] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert rates[-1] == pytest.approx(1e-5)
    assert MAMLpp(small_mlp(), loss=F.mse_loss, ca=False).configure_optimizers(1e-3, 100)[1] is None
