"""MAML's meta-gradient against independent computations: closed form and finite differences."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import MAML, Task
from fewshot.models import Conv4


def linear_tasks(num_tasks=3, dim=4, shots=6, queries=5, seed=0) -> Task:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(num_tasks, shots, dim, generator=g)
    qx = torch.randn(num_tasks, queries, dim, generator=g)
    w_true = torch.randn(num_tasks, dim, 1, generator=g)
    return Task(
        sx, sx @ w_true, qx, qx @ w_true + 0.1 * torch.randn(num_tasks, queries, 1, generator=g)
    )


def closed_form_meta_gradient(w, tasks: Task, alpha: float, steps: int, first_order: bool):
    """Linear model y = x w with loss (1/n)||Xw - y||^2: the inner update is affine,
    w <- A w + b with A = I - (2 alpha / n) X^T X, so dw_k/dw = A^k and the meta-gradient of
    L_q(w_k) is (A^k)^T grad L_q(w_k) (A is symmetric); first order replaces A^k by I."""
    total = torch.zeros_like(w)
    for sx, sy, qx, qy in zip(*tasks.tensors()):
        n_s, n_q = len(sx), len(qx)
        a = torch.eye(len(w)) - 2 * alpha / n_s * sx.T @ sx
        b = 2 * alpha / n_s * sx.T @ sy
        w_k = w.clone()
        for _ in range(steps):
            w_k = a @ w_k + b
        query_grad = 2 / n_q * qx.T @ (qx @ w_k - qy)
        jacobian = torch.eye(len(w)) if first_order else torch.linalg.matrix_power(a, steps)
        total += jacobian.T @ query_grad
    return total / len(tasks)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_meta_gradient_matches_closed_form_for_linear_regression(steps, first_order, vectorize):
    tasks = linear_tasks()
    model = nn.Linear(4, 1, bias=False)
    maml = MAML(
        model,
        inner_lr=0.05,
        inner_steps=steps,
        first_order=first_order,
        loss=F.mse_loss,
        vectorize=vectorize,
    )
    maml.meta_loss(tasks).backward()
    weight = maml.model.weight
    expected = closed_form_meta_gradient(weight.detach().T, tasks, 0.05, steps, first_order)
    torch.testing.assert_close(weight.grad.T, expected, rtol=1e-10, atol=1e-12)


def small_mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def sinusoid_like_tasks(seed=1) -> Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 10, 1, generator=g) * 10 - 5
    amp, phase = torch.rand(4, 1, 1, generator=g) * 4 + 1, torch.rand(4, 1, 1, generator=g) * 3
    y = amp * torch.sin(x - phase)
    return Task(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


def finite_difference_gradient(fn, params, eps=1e-6):
    grads = []
    for p in params:
        g = torch.zeros_like(p)
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            plus = fn().item()
            flat[i] = original - eps
            minus = fn().item()
            flat[i] = original
            g.view(-1)[i] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("vectorize", [True, False])
def test_second_order_meta_gradient_matches_finite_differences(steps, vectorize):
    model = small_mlp()
    maml = MAML(model, inner_lr=0.1, inner_steps=steps, loss=F.mse_loss, vectorize=vectorize)
    tasks = sinusoid_like_tasks()
    maml.meta_loss(tasks).backward()
    with torch.no_grad():
        expected = finite_difference_gradient(
            lambda: maml.meta_loss(tasks), list(maml.model.parameters())
        )
    for p, e in zip(maml.model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-8)


@pytest.mark.usefixtures("float64")
def test_first_order_drops_exactly_the_second_order_term():
    """FOMAML's gradient is the query-loss gradient at the adapted parameters, taken as if they
    were the initial ones; the second-order gradient differs from it by the Hessian term."""
    tasks = sinusoid_like_tasks()
    grads = {}
    for first_order in (True, False):
        maml = MAML(
            small_mlp(), inner_lr=0.1, inner_steps=1, first_order=first_order, loss=F.mse_loss
        )
        maml.meta_loss(tasks).backward()
        grads[first_order] = [p.grad.clone() for p in maml.model.parameters()]

    # Independent first-order computation: adapt with plain autograd, then differentiate the
    # query loss with respect to the adapted parameters.
    model = small_mlp()
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for sx, sy, qx, qy in zip(*tasks.tensors()):
        params = list(model.parameters())
        g = torch.autograd.grad(
            F.mse_loss(
                torch.func.functional_call(
                    model, dict(zip([n for n, _ in model.named_parameters()], params)), (sx,)
                ),
                sy,
            ),
            params,
        )
        adapted = [(p - 0.1 * gi).detach().requires_grad_() for p, gi in zip(params, g)]
        names = [n for n, _ in model.named_parameters()]
        query = F.mse_loss(torch.func.functional_call(model, dict(zip(names, adapted)), (qx,)), qy)
        for e, gq in zip(expected, torch.autograd.grad(query, adapted)):
            e += gq / len(tasks)
    for got, want in zip(grads[True], expected):
        torch.testing.assert_close(got, want)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(grads[True], grads[False]))


def conv_tasks(num_tasks=3, ways=3, shots=2, queries=2, seed=0) -> Task:
    g = torch.Generator().manual_seed(seed)
    size = 16
    sx = torch.randn(num_tasks, ways * shots, 1, size, size, generator=g)
    qx = torch.randn(num_tasks, ways * queries, 1, size, size, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).expand(num_tasks, -1)
    qy = torch.arange(ways).repeat_interleave(queries).expand(num_tasks, -1)
    return Task(sx, sy, qx, qy)


def test_vectorized_and_per_task_paths_agree_on_conv4_with_batch_norm():
    tasks = conv_tasks()
    results = []
    for vectorize in (True, False):
        torch.manual_seed(0)
        model = Conv4(out_features=3, hidden=8, image_size=16)
        maml = MAML(model, inner_lr=0.4, inner_steps=2, vectorize=vectorize)
        loss = maml.meta_loss(tasks)
        loss.backward()
        results.append(
            (
                loss.detach(),
                [p.grad for p in maml.model.parameters()],
                maml.predict(tasks, inner_steps=3),
            )
        )
    (loss_v, grads_v, pred_v), (loss_l, grads_l, pred_l) = results
    torch.testing.assert_close(loss_v, loss_l)
    torch.testing.assert_close(pred_v, pred_l)
    for a, b in zip(grads_v, grads_l):
        torch.testing.assert_close(a, b)


def test_batch_norm_uses_each_tasks_own_statistics():
    """A task's adapted prediction must not depend on the other tasks in its meta-batch."""
    tasks = conv_tasks(num_tasks=3)
    torch.manual_seed(0)
    maml = MAML(Conv4(out_features=3, hidden=8, image_size=16), inner_lr=0.4)
    together = maml.predict(tasks)
    alone = maml.predict(tasks[1:2])
    torch.testing.assert_close(together[1:2], alone)


def test_user_model_with_running_statistics_is_left_unchanged_by_wrapping_and_training():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    )
    model(torch.zeros(1, 1, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maml = MAML(model)
    maml.meta_loss(conv_tasks()).backward()
    maml.predict(conv_tasks())
    assert model[1].running_mean is not None and model[1].track_running_stats
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert maml.model[1].running_mean is None  # the copy normalises with batch statistics
    assert all(p.grad is not None for p in maml.model.parameters())


def test_adapt_returns_a_predictor_whose_parameters_lower_the_support_loss():
    maml = MAML(small_mlp(), inner_lr=0.05, loss=F.mse_loss)
    tasks = sinusoid_like_tasks()[:1]
    before = F.mse_loss(maml.model(tasks.support_x[0]), tasks.support_y[0])
    predictor = maml.adapt(tasks.support_x, tasks.support_y, inner_steps=5)
    after = F.mse_loss(predictor(tasks.support_x)[0], tasks.support_y[0])
    adapted = {name: p[0] for name, p in predictor.params.items()}
    direct = torch.func.functional_call(maml.model, adapted, (tasks.support_x[0],))
    assert after < before
    torch.testing.assert_close(predictor(tasks.support_x)[0], direct)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("vectorize", [True, False])
def test_second_order_meta_gradient_through_batch_norm_matches_finite_differences(vectorize):
    """Batch norm's fused kernel inside the second-order pass, with and without vmap.

    Guards the design of MAML's vectorised path: vmapping only the forward pass keeps every
    backward pass plain autograd. (Nesting torch.func.grad inside vmap instead gives wrong
    second-order gradients through the fused kernel in torch 2.13, off by ~1e-2 here.)
    """
    tasks = conv_tasks(num_tasks=2, ways=2)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 14 * 14, 2)
    )
    maml = MAML(model, inner_lr=0.4, inner_steps=1, vectorize=vectorize)
    maml.meta_loss(tasks).backward()
    first, second = list(maml.model.parameters())[:3:2]  # conv weight, batch-norm weight
    with torch.no_grad():
        expected = finite_difference_gradient(lambda: maml.meta_loss(tasks), [first, second])
    torch.testing.assert_close(first.grad, expected[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(second.grad, expected[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("vectorize", "chunk_size"), [(False, None), (True, 2), (True, 1)])
def test_chunked_backward_gives_the_meta_loss_gradient(vectorize, chunk_size):
    """The memory-saving backward, a chunk (or one task) at a time, accumulates exactly the
    gradient of meta_loss computed over the whole meta-batch at once."""
    tasks = conv_tasks(num_tasks=3)
    results = []
    for use_backward_method in (False, True):
        torch.manual_seed(0)
        model = Conv4(out_features=3, hidden=8, image_size=16)
        maml = MAML(model, inner_lr=0.4, inner_steps=2, vectorize=vectorize, chunk_size=chunk_size)
        if use_backward_method:
            loss = torch.tensor(maml.training_step(tasks)["loss"])
        else:
            loss = maml.meta_loss(tasks)
            loss.backward()
            loss = loss.detach()
        results.append((loss, [p.grad.clone() for p in maml.model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("vectorize", [True, False])
def test_frozen_parameters_are_neither_adapted_nor_meta_learned(vectorize):
    model = small_mlp()
    model[0].weight.requires_grad_(False)
    maml = MAML(model, inner_lr=0.05, loss=F.mse_loss, vectorize=vectorize)
    tasks = sinusoid_like_tasks()
    adapted = maml.trajectory(tasks.support_x, tasks.support_y, steps=2).params[-1]
    first = maml.model[0]
    assert torch.equal(adapted["0.weight"], first.weight.expand(len(tasks), -1, -1))
    assert not torch.equal(adapted["0.bias"], first.bias.expand(len(tasks), -1))
    maml.meta_loss(tasks).backward()
    assert first.weight.grad is None and first.bias.grad is not None


def test_a_learner_without_chunk_size_chunks_as_the_command_line_does():
    """Image tasks on a CPU: as many tasks per pass as fit in 40 images; vectors: all at once."""
    import fewshot
    from fewshot.tasks import Task

    maml = fewshot.MAML(fewshot.Conv4(out_features=5))
    images = Task(torch.zeros(8, 5, 1, 28, 28), torch.zeros(8, 5, dtype=torch.long),
                  torch.zeros(8, 5, 1, 28, 28), torch.zeros(8, 5, dtype=torch.long))  # fmt: skip
    assert [len(c) for c in maml.chunks(images)] == [4, 4]  # 10 images per task
    vectors = Task(torch.zeros(8, 10, 1), torch.zeros(8, 10, 1), torch.zeros(8, 10, 1),
                   torch.zeros(8, 10, 1))  # fmt: skip
    assert [len(c) for c in fewshot.MAML(fewshot.SinusoidMLP()).chunks(vectors)] == [8]
