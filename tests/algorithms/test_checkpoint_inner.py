"""Activation checkpointing through the inner loop (`checkpoint_inner`) gives the meta-gradient
computed without it, and the meta-gradient that finite differences of the meta-loss give."""

import pytest
import torch
from torch import nn

from fewshot import ANIL, MAML, MAMLpp, MetaSGD, Task
from fewshot.algorithms.gradient import plain_tail
from fewshot.errors import ConfigError
from fewshot.models import Conv4, ResNet12, body_and_head


def image_tasks(num_tasks=3, ways=3, shots=2, queries=2, channels=1, seed=0) -> Task:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(num_tasks, ways * shots, channels, 16, 16, generator=g)
    qx = torch.randn(num_tasks, ways * queries, channels, 16, 16, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).expand(num_tasks, -1)
    qy = torch.arange(ways).repeat_interleave(queries).expand(num_tasks, -1)
    return Task(sx, sy, qx, qy)


def small_conv4() -> nn.Module:
    torch.manual_seed(0)
    return Conv4(1, 3, hidden=4, image_size=16)


def small_resnet12() -> nn.Module:
    torch.manual_seed(0)
    return ResNet12(1, 3, (3, 4, 5, 6), image_size=16)


def meta_gradient(learner, tasks: Task) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The meta-loss and its gradient with respect to every meta-learned parameter, as
    `training_step` (chunked) back-propagates it."""
    loss = learner.training_step(tasks)["loss"]
    return torch.tensor(loss), [p.grad for p in learner.parameters() if p.requires_grad]


def assert_same_meta_gradient(make, tasks: Task) -> None:
    loss, grads = meta_gradient(make(checkpoint_inner=False), tasks)
    loss_ck, grads_ck = meta_gradient(make(checkpoint_inner=True), tasks)
    torch.testing.assert_close(loss_ck, loss)
    assert len(grads) == len(grads_ck) and all(g is not None for g in grads)
    for a, b in zip(grads_ck, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("network", [small_conv4, small_resnet12], ids=["conv4", "resnet12"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "per-task"])
def test_maml_meta_gradient_is_the_same_with_checkpointing(network, first_order, vectorize):
    tasks = image_tasks()
    model = network()

    def make(**options):
        return MAML(
            model,
            inner_lr=0.3,
            inner_steps=3,
            first_order=first_order,
            vectorize=vectorize,
            chunk_size=2,
            **options,
        )

    assert_same_meta_gradient(make, tasks)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "per-task"])
def test_meta_sgd_and_anil_meta_gradients_are_the_same_with_checkpointing(vectorize):
    """The rule's learned step sizes (Meta-SGD) and an encoder run before the inner loop
    (ANIL's body, checkpointed by segments) receive the same gradients."""
    tasks = image_tasks()
    model = small_resnet12()
    assert_same_meta_gradient(
        lambda **o: MetaSGD(model, inner_lr=0.2, inner_steps=2, vectorize=vectorize, **o), tasks
    )
    body, head = body_and_head(model)
    assert_same_meta_gradient(
        lambda **o: ANIL(body, head, inner_lr=0.2, inner_steps=2, vectorize=vectorize, **o), tasks
    )


def finite_difference_directional(fn, params: list[torch.Tensor], directions, eps=1e-6) -> float:
    """(f(theta + eps v) - f(theta - eps v)) / (2 eps): the derivative of f along v."""
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, v in zip(params, directions):
                p.add_(sign * eps * v)
            values.append(fn().item())
            for p, v in zip(params, directions):
                p.sub_(sign * eps * v)
    return (values[0] - values[1]) / (2 * eps)


def smooth_conv_net() -> nn.Module:
    """Convolutions with batch norm and tanh: a meta-loss smooth enough for finite differences
    (through ReLU's or max-pooling's kinks the inner gradient, hence the meta-loss, jumps)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "per-task"])
def test_checkpointed_meta_gradient_matches_finite_differences(vectorize):
    """Second-order MAML, 2 inner steps, a conv net with batch norm checkpointed layer by layer:
    <grad, v> against the central difference of the meta-loss along random directions v."""
    tasks = image_tasks(num_tasks=2)
    maml = MAML(
        smooth_conv_net(), inner_lr=0.3, inner_steps=2, vectorize=vectorize, checkpoint_inner=True
    )
    _, grads = meta_gradient(maml, tasks)
    params = [p for p in maml.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        directions = [torch.randn(p.shape, generator=g) for p in params]
        analytic = sum((gr * v).sum() for gr, v in zip(grads, directions)).item()
        numeric = finite_difference_directional(lambda: maml.meta_loss(tasks), params, directions)
        assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-9)


def test_checkpointing_keeps_the_query_pass_out_of_prediction():
    """Without gradients (adaptation, prediction) nothing is checkpointed: the same outputs."""
    tasks = image_tasks()
    model = small_resnet12()
    plain = MAML(model, inner_lr=0.3, inner_steps=2).predict(tasks)
    checkpointed = MAML(model, inner_lr=0.3, inner_steps=2, checkpoint_inner=True).predict(tasks)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


def test_maml_plus_plus_refuses_checkpointing_with_per_step_running_statistics():
    with pytest.raises(ConfigError, match="checkpoint_inner"):
        MAMLpp(small_conv4(), checkpoint_inner=True)
    learner = MAMLpp(small_conv4(), inner_steps=2, bnrs=False, da=False, checkpoint_inner=True)
    assert learner.checkpoint_inner


@pytest.mark.usefixtures("float64")
def test_checkpointed_meta_gradient_by_autograd_grad():
    """The recomputed inner steps answer `torch.autograd.grad` as `backward` does (they return
    their inputs' gradients rather than accumulating them), and refuse a second derivative."""
    tasks = image_tasks(num_tasks=2)
    model = small_resnet12()
    plain = MAML(model, inner_lr=0.3, inner_steps=2)
    checkpointed = MAML(model, inner_lr=0.3, inner_steps=2, checkpoint_inner=True)
    expected = torch.autograd.grad(plain.meta_loss(tasks), list(plain.parameters()))
    loss = checkpointed.meta_loss(tasks)
    grads = torch.autograd.grad(loss, list(checkpointed.parameters()), create_graph=True)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward"):
        sum(g.sum() for g in grads).backward()


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "per-task"])
def test_inner_steps_run_the_model_once_each_before_the_backward_pass(vectorize):
    """A recomputed inner step computes its forward pass once in the forward pass (its inner
    gradient reuses it) and once more in the backward pass: 3 steps + 1 query pass = 4, then
    3 more."""
    tasks = image_tasks(num_tasks=2)
    maml = MAML(
        small_conv4(), inner_lr=0.3, inner_steps=3, vectorize=vectorize, checkpoint_inner=True
    )
    calls = []

    def count(module, inputs):  # before the call: a recomputation may stop inside it
        if inputs[0].device.type != "meta":  # the measure of the segments' sizes
            calls.append(1)

    maml.model.features[0].register_forward_pre_hook(count)
    loss = maml.meta_loss(tasks)
    forward_calls = len(calls) // (1 if vectorize else 2)  # one call per task without vmap
    loss.backward()
    backward_calls = len(calls) // (1 if vectorize else 2) - forward_calls
    assert (forward_calls, backward_calls) == (4, 4)


def test_plain_tail_keeps_the_trailing_segments_no_larger_than_the_largest_checkpointed():
    assert plain_tail([10, 40, 20, 8, 6, 0]) == 4  # 20 + 8 + 6 + 0 = 34 <= 40
    assert plain_tail([10, 40, 30, 8, 6, 0]) == 3  # 30 + 14 > 40
    assert plain_tail([50, 10]) == 1
    assert plain_tail([10]) == 0  # a single segment is checkpointed
    assert plain_tail(None) == 0  # sizes unknown (no meta implementation): all checkpointed


def test_resnet12_recomputes_its_first_blocks_and_keeps_its_last_at_84x84():
    """At miniImageNet's size, blocks 3 and 4 of ResNet-12 save less together than block 1's
    last stage (75 queries: about 720 MB against 620 MB), so only blocks 1 and 2 and the first
    stage of block 3 are recomputed; the sizes are measured on the meta device."""
    torch.manual_seed(0)
    model = ResNet12(3, 5).float()  # as trained, whatever the default dtype
    maml = MAML(model, inner_lr=0.01, checkpoint_inner=True, vectorize=False)
    params = {n: p.expand(1, *p.shape) for n, p in maml.model.named_parameters()}
    segments = maml._segments(maml.model, params, True, None)
    saved = maml._saved_bytes(segments, torch.empty(1, 75, 3, 84, 84, dtype=torch.float32))
    mib = [s / 2**20 for s in saved]
    # Block 1's last stage: its input, 4 more maps of 75 x 64 x 84 x 84 floats, the pooling's
    # int64 indices and the shortcut's input.
    assert mib[2] == pytest.approx(5 * 129.2 + 64.6 + 6.5, rel=0.01)
    assert plain_tail(saved) == 8  # block 3's stages 1-2, block 4, pooling and head


def test_measuring_the_segments_leaves_the_models_buffers_alone():
    """The sizes are measured on meta copies of the buffers too: running statistics and batch
    counts of a network that keeps them are not touched."""
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16, track_running_stats=True)
    maml = MAML(model, inner_lr=0.3, checkpoint_inner=True, running_statistics=True)
    before = {n: b.clone() for n, b in maml.model.named_buffers()}
    params = {n: p.expand(2, *p.shape) for n, p in maml.model.named_parameters()}
    segments = maml._segments(maml.model, params, True, None)
    saved = maml._saved_bytes(segments, torch.empty(2, 6, 1, 16, 16))
    assert saved is not None and saved[0] > 0
    after = dict(maml.model.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)
