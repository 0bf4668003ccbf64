"""The fine-tuning family (Baseline, Baseline++, FineTune): the cosine head by hand,
pretraining as plain supervised learning, fine-tuning against torch's own SGD."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import Baseline, BaselinePlusPlus, Batch, FineTune
from fewshot.algorithms.baseline import CosineClassifier
from fewshot.models import Conv4
from fewshot.training import evaluate
from tests.algorithms.test_maml import conv_tasks


def tiny_body(seed=0):
    torch.manual_seed(seed)
    return Conv4(out_features=None, hidden=8, image_size=16, track_running_stats=True)


FEATURES = 8  # tiny_body's output size for 16 x 16 inputs


def pretrained(method_class, seed=0, **options):
    """A learner after two pretraining steps, so running statistics are away from their start."""
    body = tiny_body(seed)
    if method_class is BaselinePlusPlus:
        learner = BaselinePlusPlus(body, FEATURES, ways=3, classes=7, **options)
    else:
        learner = method_class(body, nn.Linear(FEATURES, 3), nn.Linear(FEATURES, 7), **options)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        batch = Batch(torch.randn(6, 1, 16, 16, generator=g), torch.randint(7, (6,), generator=g))
        learner.training_step(batch)
    return learner.eval()


def test_cosine_logits_are_the_scaled_cosines_times_the_class_norms():
    torch.manual_seed(0)
    head = CosineClassifier(4, 3)
    with torch.no_grad():
        head.norm.copy_(torch.tensor([0.5, 2.0, 1.5]))
    x = torch.randn(2, 4)
    logits = head(x)
    for i in range(2):
        for j in range(3):
            v = head.direction[j]
            cosine = x[i] @ v / ((x[i].norm() + 1e-5) * v.norm())
            torch.testing.assert_close(logits[i, j], 2.0 * head.norm[j] * cosine)


def test_cosine_head_gradients_are_those_of_the_written_out_formula():
    """The head differentiates like s g_j (x/||x||) . v_j/||v_j||."""
    torch.manual_seed(0)
    head = CosineClassifier(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    upstream = torch.randn(5, 3, dtype=torch.float64)
    v, g = head.direction.detach().requires_grad_(), head.norm.detach().requires_grad_()
    unit_x = x / (x.norm(dim=-1, keepdim=True) + 1e-5)
    written_out = 2.0 * unit_x @ (g.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)).T
    torch.autograd.backward(written_out, upstream)
    torch.autograd.backward(head(x), upstream)
    torch.testing.assert_close(head.direction.grad, v.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.norm.grad, g.grad, rtol=1e-12, atol=1e-12)


def test_cosine_scale_is_2_up_to_200_classes_and_10_above():
    assert CosineClassifier(4, 200).scale == 2.0
    assert CosineClassifier(4, 201).scale == 10.0
    assert CosineClassifier(4, 5, scale=4.0).scale == 4.0
    head = CosineClassifier(4, 5)  # weight norm starts at ||v||: logits = 2 cos(x, v_j) ||v_j||
    torch.testing.assert_close(head.norm, head.direction.norm(dim=1))


def test_pretraining_is_cross_entropy_over_all_training_classes():
    learner = Baseline(tiny_body(), nn.Linear(FEATURES, 3), nn.Linear(FEATURES, 7))
    body, classifier = copy.deepcopy(learner.body), copy.deepcopy(learner.classifier)
    batch = Batch(torch.randn(6, 1, 16, 16), torch.tensor([0, 6, 3, 3, 1, 5]))
    metrics = learner.training_step(batch)
    expected = F.cross_entropy(classifier(body(batch.x)), batch.y)
    assert metrics["loss"] == pytest.approx(expected.item())
    expected.backward()
    torch.testing.assert_close(learner.classifier.weight.grad, classifier.weight.grad)
    torch.testing.assert_close(
        learner.body.features[0][0].weight.grad, body.features[0][0].weight.grad
    )
    assert learner.head.weight.grad is None  # the episode head is not pretrained
    torch.testing.assert_close(
        learner.body.features[0][1].running_mean, body.features[0][1].running_mean
    )


def test_fine_tuning_steps_are_epochs_of_mini_batches_that_end_with_each_epoch():
    """Chen et al.'s BaselineFinetune: every epoch is cut into batches of 4, the last smaller."""
    learner = Baseline(tiny_body(), nn.Linear(FEATURES, 3), epochs=100, batch=4)
    assert learner.fine_tuning_steps(5) == 200  # each epoch a batch of 4, then one of 1
    assert learner.fine_tuning_steps(25) == 700  # 6 batches of 4, then one of 1
    assert learner.fine_tuning_steps(8) == 200
    assert learner.fine_tuning_steps(3) == 100  # a batch larger than the set: full batch
    assert learner.eval_inner_steps is None
    assert Baseline(tiny_body(), nn.Linear(FEATURES, 3), batch=None, epochs=7).eval_inner_steps == 7


class RowCounter(nn.Module):
    """A head that records how many examples each of its calls sees."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, x):
        self.rows.append(len(x))
        return self.head(x)


def test_each_fine_tuning_epoch_sees_every_support_example_once_in_batches_of_4_then_1():
    learner = Baseline(tiny_body(), RowCounter(nn.Linear(FEATURES, 3)), epochs=3, batch=4)
    learner.vectorize = False  # one task at a time, so the head sees each step's rows
    tasks = conv_tasks(num_tasks=1)  # 3 ways, 1 shot...
    support = torch.cat([tasks.support_x] * 2, dim=1)[:, :5]  # ...made 5 support examples
    labels = torch.cat([tasks.support_y] * 2, dim=1)[:, :5]
    learner.eval().adapt_tasks(support, labels)
    assert learner.head.rows == [4, 1] * 3


@pytest.mark.parametrize("method_class", [Baseline, FineTune])
def test_full_batch_fine_tuning_equals_torch_sgd_in_eval_mode(method_class):
    """Each episode's head (and body, for FineTune) fitted by torch.optim.SGD with the same
    momentum, dampening and weight decay, batch norm on the running statistics."""
    options = dict(lr=0.05, momentum=0.9, dampening=0.9, weight_decay=1e-3, epochs=4, batch=None)
    learner = pretrained(method_class, **options)
    tasks = conv_tasks(num_tasks=2)
    predictions = learner.predict(tasks)
    for t in range(2):
        network = copy.deepcopy(nn.Sequential(learner.body, learner.head)).eval()
        trained = network if method_class is FineTune else network[1]
        optimizer = torch.optim.SGD(
            trained.parameters(), lr=0.05, momentum=0.9, dampening=0.9, weight_decay=1e-3
        )
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(network(tasks.support_x[t]), tasks.support_y[t]).backward()
            optimizer.step()
        with torch.no_grad():
            torch.testing.assert_close(predictions[t], network(tasks.query_x[t]))


@pytest.mark.parametrize(
    "method_class, changed",
    [(Baseline, {"head"}), (BaselinePlusPlus, {"head"}), (FineTune, {"head", "body"})],
)
def test_baseline_fits_only_the_head_and_finetune_every_layer(method_class, changed):
    learner = pretrained(method_class, epochs=3)
    tasks = conv_tasks(num_tasks=2)
    fitted = learner.adapt(tasks.support_x, tasks.support_y).params
    start = dict(learner.model.named_parameters())
    moved = {
        name: not torch.allclose(fitted[name], p.expand_as(fitted[name]))
        for name, p in start.items()
    }
    part = (
        (lambda name: "head" if name.startswith("1.") else "body")
        if learner.adapt_body
        else (lambda name: "head")
    )
    assert {part(name) for name, m in moved.items() if m} == changed
    assert all(moved.values())  # every fitted parameter moved, in the head and (FineTune) body
    if not learner.adapt_body:  # Baseline's body is the frozen encoder, not fitted at all
        assert not any(n.startswith("0.") for n in fitted)


@pytest.mark.parametrize("method_class", [Baseline, FineTune])
def test_a_query_is_predicted_independently_of_the_other_queries(method_class):
    learner = pretrained(method_class, epochs=2)
    tasks = conv_tasks()
    others = tasks.query_x.clone()
    others[:, 1:] = torch.randn(others[:, 1:].shape) * 3 + 1
    torch.manual_seed(0)  # the same fine-tuning mini-batches for both
    alone = learner.predict(tasks)[:, 0]
    torch.manual_seed(0)
    changed = learner.predict(type(tasks)(tasks.support_x, tasks.support_y, others, tasks.query_y))
    torch.testing.assert_close(alone, changed[:, 0])


def test_evaluation_seeds_the_fine_tuning_mini_batches_and_restores_the_callers_generator():
    from fewshot.tasks import TaskSampler

    learner = pretrained(Baseline, epochs=3, batch=2).float()  # the sampler's images are float32
    images = torch.rand(40, 1, 16, 16)
    sampler = TaskSampler(images, torch.arange(40) // 4, ways=3, shots=2, queries=2)
    torch.manual_seed(123)
    first = evaluate(learner, sampler, episodes=30, seed=0)
    after = torch.rand(1)
    torch.manual_seed(456)
    assert evaluate(learner, sampler, episodes=30, seed=0) == first
    torch.manual_seed(123)
    torch.testing.assert_close(torch.rand(1), after)  # evaluation drew nothing from it
