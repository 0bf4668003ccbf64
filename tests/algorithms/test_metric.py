"""The metric-learning base: unflattened embeddings reach `score`, batch norm in training keeps
each task apart, and prediction leaves the running statistics alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import MetricLearner, ProtoNet
from fewshot.algorithms.metric import SupportFineTuning
from fewshot.errors import ConfigError
from fewshot.models import Conv4
from fewshot.tasks import Task
from fewshot.training.config import TrainConfig
from fewshot.training.factory import build_algorithm
from tests.algorithms.test_maml import conv_tasks


class MeanMapScore(MetricLearner):
    """A metric learner that records the embedding shape it is given."""

    def score(self, support_z, support_y, query_z):
        self.seen_shape = tuple(support_z.shape)
        prototypes = F.one_hot(support_y).transpose(1, 2).to(support_z.dtype) @ support_z.flatten(2)
        return query_z.flatten(2) @ prototypes.transpose(1, 2)


def test_score_receives_feature_maps_unflattened():
    encoder = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
    learner = MeanMapScore(encoder, batch_norm="transductive")
    tasks = conv_tasks(num_tasks=2, ways=3, shots=2)
    learner.meta_loss(tasks).backward()
    assert learner.seen_shape == (2, 6, 3, 16, 16)
    assert learner.predict(tasks).shape == (2, 6, 3)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("policy", ["transductive", "inductive"])
def test_prediction_leaves_the_running_statistics_unchanged(policy, training):
    """Under either policy, and whether the module is in training or eval mode."""
    torch.manual_seed(0)
    encoder = Conv4(out_features=None, hidden=8, image_size=16, track_running_stats=True)
    protonet = ProtoNet(encoder, batch_norm=policy)
    protonet.training_step(conv_tasks())
    protonet.train(training)
    before = {k: v.clone() for k, v in protonet.state_dict().items()}
    assert before["encoder.features.0.1.running_mean"].abs().sum() > 0  # training moved them
    protonet.predict(conv_tasks(seed=3))
    assert all(torch.equal(v, protonet.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", ["protonet", "matchingnet", "relationnet"])
def test_in_training_batch_norm_never_pools_statistics_across_the_tasks_of_a_meta_batch(name):
    """A meta-batch's loss, with batch norm on batch statistics, is the mean of its tasks'
    losses each computed alone."""
    config = TrainConfig(algorithm=name, dataset="omniglot", ways=3, shots=2, queries=2)
    config = config.resolved()
    torch.manual_seed(0)
    learner = build_algorithm(config).train()
    generator = torch.Generator().manual_seed(1)
    tasks = Task(
        torch.rand(3, 6, 1, 28, 28, generator=generator),
        torch.arange(3).repeat_interleave(2).expand(3, -1),
        torch.rand(3, 6, 1, 28, 28, generator=generator),
        torch.arange(3).repeat_interleave(2).expand(3, -1),
    )
    with torch.no_grad():
        together = learner.meta_loss(tasks)
        alone = torch.stack([learner.meta_loss(tasks[i : i + 1]) for i in range(3)])
        pooled = learner.meta_loss(tasks[:2])  # differs from tasks 0 and 1 alone if pooled
    torch.testing.assert_close(together, alone.mean())
    torch.testing.assert_close(pooled, alone[:2].mean())


# P>M>F's F: fine-tuning on each episode's support set before predicting


def linear_protonet(batch_norm: str = "inductive") -> ProtoNet:
    torch.manual_seed(0)
    return ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(256, 4)), batch_norm=batch_norm)


def test_one_fine_tuning_step_is_adams_first_step_on_the_support_sets_own_loss(float64):
    """Adam's first step moves each parameter by lr * g / (|g| + eps), g the gradient of the
    support set's prototype loss scored on the support set itself (no augmentation): computed
    here with torch.func, and the predictions of the moved encoder compared."""
    protonet = linear_protonet()
    tasks = conv_tasks(num_tasks=2, ways=3, shots=2, queries=3)
    lr = 0.05
    protonet.set_support_fine_tuning(SupportFineTuning(steps=1, lr=lr, augment=""))
    with torch.no_grad():
        predicted = protonet.predict(tasks)
    params = dict(protonet.encoder.named_parameters())
    for task in range(2):
        x, y = tasks.support_x[task], tasks.support_y[task]

        def support_loss(p, x=x, y=y):
            z = torch.func.functional_call(protonet.encoder, p, (x,))
            prototypes = torch.stack([z[y == k].mean(0) for k in range(3)])
            logits = -((z[:, None] - prototypes[None]) ** 2).sum(-1)
            return F.cross_entropy(logits, y)

        grads = torch.func.grad(support_loss)(params)
        moved = {n: p - lr * grads[n] / (grads[n].abs() + 1e-8) for n, p in params.items()}
        support_z = torch.func.functional_call(protonet.encoder, moved, (x,))
        query_z = torch.func.functional_call(protonet.encoder, moved, (tasks.query_x[task],))
        prototypes = torch.stack([support_z[y == k].mean(0) for k in range(3)])
        expected = -((query_z[:, None] - prototypes[None]) ** 2).sum(-1)
        torch.testing.assert_close(predicted[task], expected)


def test_fine_tuning_changes_the_predictions_and_never_the_trained_method():
    protonet = linear_protonet()
    tasks = conv_tasks(num_tasks=3, ways=3, shots=2, queries=3)
    before = {k: v.clone() for k, v in protonet.state_dict().items()}
    with torch.no_grad():
        plain = protonet.predict(tasks)
    protonet.set_support_fine_tuning(SupportFineTuning(steps=5, lr=0.05))
    with torch.no_grad():
        tuned = protonet.predict(tasks)
    assert not torch.allclose(plain, tuned)
    assert all(torch.equal(protonet.state_dict()[k], v) for k, v in before.items())
    # each episode starts from the trained method: alone, it gets what it got beside others
    torch.manual_seed(3)
    with torch.no_grad():
        first = protonet.predict(tasks)
        alone = protonet.adapt(tasks.support_x[1:2], tasks.support_y[1:2])(tasks.query_x[1:2])
    torch.manual_seed(3)
    with torch.no_grad():
        again = protonet.predict(tasks)
    assert torch.equal(first, again)  # the same random draws, the same figures
    assert alone.shape == (1, 9, 3)


def test_fine_tuning_is_inductive_each_query_alone_gets_the_same_logits():
    protonet = linear_protonet()
    protonet.set_support_fine_tuning(SupportFineTuning(steps=3, lr=0.05))
    tasks = conv_tasks(num_tasks=1, ways=3, shots=2, queries=3)
    torch.manual_seed(1)
    with torch.no_grad():
        together = protonet.adapt(tasks.support_x, tasks.support_y)(tasks.query_x)
    torch.manual_seed(1)
    with torch.no_grad():
        predictor = protonet.adapt(tasks.support_x, tasks.support_y)
        alone = torch.cat([predictor(tasks.query_x[:, i : i + 1]) for i in range(9)], dim=1)
    torch.testing.assert_close(together, alone)


def test_fine_tuning_settings_are_checked_and_other_methods_refuse_them():
    with pytest.raises(ConfigError, match="`finetune_steps` must be positive"):
        SupportFineTuning(steps=0, lr=0.1)
    with pytest.raises(ConfigError, match="unknown spin"):
        SupportFineTuning(steps=1, lr=0.1, augment="spin")
    maml = build_algorithm(TrainConfig(algorithm="maml", dataset="omniglot").resolved())
    with pytest.raises(ConfigError, match="MAML adapts its own way"):
        maml.set_support_fine_tuning(SupportFineTuning(steps=1, lr=0.1))


def test_fine_tuning_a_frozen_encoder_is_refused():
    protonet = linear_protonet()
    protonet.encoder.requires_grad_(False)
    with pytest.raises(ConfigError, match="the encoder is frozen whole"):
        protonet.set_support_fine_tuning(SupportFineTuning(steps=1, lr=0.1))
