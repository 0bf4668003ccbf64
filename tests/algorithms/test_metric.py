"""The metric-learning base: unflattened embeddings reach `score`, batch norm in training keeps
each task apart, and prediction leaves the running statistics alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot import MetricLearner, ProtoNet
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
