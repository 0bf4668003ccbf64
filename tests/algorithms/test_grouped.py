"""Tasks as groups (`gradient.grouped`): every task's outputs, gradients and second-order
gradients equal those of the task's own network under vmap (float64), for the networks it
takes, and the networks it does not take run under vmap."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fewshot import MAML, Task
from fewshot.algorithms.gradient import grouped
from fewshot.algorithms.gradient.parallel import on_every_task
from fewshot.backbones import FrozenBatchNorm
from fewshot.models import Conv4, ResNet12

TASKS, IMAGES = 3, 4


def per_task(module: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Each task its own parameters: the module's, moved apart by noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: (p.detach() + 0.3 * torch.randn(TASKS, *p.shape, generator=g, dtype=p.dtype))
        .clone()
        .requires_grad_()
        for n, p in module.named_parameters()
    }


def under_vmap(module: nn.Module, params, x):
    buffers = dict(module.named_buffers())

    def call(p, b, xs):
        return functional_call(module, (p, b), (xs,))

    return vmap(call, in_dims=(0, None, 0))(params, buffers, x)


def images(channels: int = 1, size: int = 28, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TASKS, IMAGES, channels, size, size, generator=g, dtype=torch.float64)


def two_orders(outputs: torch.Tensor, params) -> list[torch.Tensor]:
    """The gradient of a loss of the outputs, then the gradient of that gradient's squared
    norm (second order, as MAML's meta-gradient takes it), for every parameter."""
    targets = torch.arange(outputs.shape[-1]).repeat(TASKS, IMAGES // outputs.shape[-1] + 1)
    loss = F.cross_entropy(outputs.flatten(0, 1), targets[:, :IMAGES].flatten()) * TASKS
    first = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), list(params.values()))
    return [*first, *second]


def networks() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    running = Conv4(1, 4, hidden=8, track_running_stats=True).eval()
    with torch.no_grad():  # running statistics that are not the identity
        for layer in running.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
    strided = nn.Sequential(
        nn.Conv2d(1, 6, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(6, affine=False, track_running_stats=False),
        nn.LeakyReLU(0.1),
        nn.Conv2d(6, 6, 1),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(6 * 7 * 7, 4),
    )
    untracked = Conv4(1, 4, hidden=8, track_running_stats=True).train()
    for layer in untracked.modules():  # buffers kept, but batch statistics used and not updated
        if isinstance(layer, nn.BatchNorm2d):
            layer.track_running_stats = False
    return {
        "conv4, batch statistics": Conv4(1, 4, hidden=8),
        "conv4, buffers no longer tracked": untracked,
        "conv4, running statistics": running,
        "conv4 embedding": Conv4(1, None, hidden=8),
        "strides, no affine, leaky": strided,
        "images out": nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
    }


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("twice", [False, True], ids=["channels-last", "default layout"])
@pytest.mark.parametrize("name", list(networks()))
def test_as_groups_each_task_gets_its_own_networks_outputs_and_both_orders_of_gradient(name, twice):
    module = networks()[name].double()
    x = images()
    assert grouped.runs_grouped(module, x)
    params = per_task(module)
    with grouped.differentiated_twice(twice):
        assert grouped.layout() == (torch.contiguous_format if twice else torch.channels_last)
        ours = grouped.on_every_task(module, params, x)
    theirs = under_vmap(module, params, x)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    if ours.dim() == 3 and ours.shape[-1] == 4:  # logits: differentiate a loss of them
        for a, b in zip(two_orders(ours, params), two_orders(theirs, params), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_networks_it_does_not_take_run_under_vmap():
    x = images().float()
    hooked = Conv4(1, 4, hidden=8)
    hooked.features[0].register_forward_hook(lambda *args: None)
    tracking = Conv4(1, 4, hidden=8, track_running_stats=True).train()  # would update them
    frozen = Conv4(1, 4, hidden=8, track_running_stats=True)
    frozen.features[0][1] = FrozenBatchNorm(frozen.features[0][1], learn_affine=True)
    replaced = Conv4(1, 4, hidden=8)
    replaced.features.forward = lambda h: h  # as `feature_cache.skipped` does to a backbone
    refused = {
        "a forward of its own": replaced,
        "residual blocks": ResNet12(1, 4, widths=(4, 4, 4, 4)),
        "no convolution": nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 4)),
        "a hook": hooked,
        "running statistics to update": tracking,
        "a layer of its own": frozen,
        "linear before flatten": nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(26, 3)),
        "convolution after flatten": nn.Sequential(nn.Flatten(), nn.Conv2d(1, 2, 3)),
    }
    for name, module in refused.items():
        assert not grouped.runs_grouped(module, x), name
    assert not grouped.runs_grouped(Conv4(1, 4), x.flatten(2))  # not images
    hook = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:  # a hook for every module, which only a module's own call runs
        assert not grouped.runs_grouped(Conv4(1, 4, hidden=8), x)
    finally:
        hook.remove()
    assert grouped.runs_grouped(Conv4(1, 4, hidden=8), x)


@pytest.mark.usefixtures("float64")
def test_maml_adapts_and_meta_learns_the_same_as_groups_and_task_by_task():
    """The learner's vectorised path (as groups, Conv4) against its plain per-task loop: the
    adapted parameters and the second-order meta-gradient."""
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=8).double()
    x, y = images(), torch.arange(3).repeat(TASKS, 2)[:, :IMAGES]

    tasks = Task(x[:, :2], y[:, :2], x[:, 2:], y[:, 2:])
    results = []
    for vectorize in (True, False):
        maml = MAML(model, inner_lr=0.1, inner_steps=2, vectorize=vectorize)
        maml.zero_grad()
        maml.meta_loss(tasks).backward()
        adapted = maml.trajectory(tasks.support_x, tasks.support_y, 2, False).params[-1]
        results.append((adapted, [p.grad for p in maml.parameters()]))
    (adapted, gradient), (plain, plain_gradient) = results
    for name in plain:
        torch.testing.assert_close(adapted[name], plain[name], rtol=1e-10, atol=1e-12)
    for a, b in zip(gradient, plain_gradient, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_the_vectorised_call_takes_groups_only_where_they_apply(monkeypatch):
    """`parallel.on_every_task` runs a network as groups for per-task parameters and the
    module's own buffers, and under vmap with shared parameters or per-task buffers."""
    calls = []
    real = grouped.on_every_task
    monkeypatch.setattr(grouped, "on_every_task", lambda *a: calls.append(1) or real(*a))
    module = Conv4(1, 4, hidden=8)
    x = images().float()
    params = per_task(module)
    on_every_task(module, params, x, True, vectorize=True)
    assert calls == [1]
    shared = dict(module.named_parameters())
    on_every_task(module, shared, x, False, vectorize=True)
    on_every_task(module, params, x, True, vectorize=False)
    # A parameter not given keeps the module's own value for every task, as vmap's call has it.
    without_one = {n: p for n, p in params.items() if n != "head.bias"}
    out = on_every_task(module, without_one, x, True, vectorize=True)
    assert calls == [1]
    torch.testing.assert_close(out, under_vmap(module, without_one, x))
