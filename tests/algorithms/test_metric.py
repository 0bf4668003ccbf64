"""The metric-learning base: unflattened embeddings reach `score`, and prediction modes of
batch norm leave the running statistics alone."""

import torch
import torch.nn.functional as F
from torch import nn

from fewshot import MetricLearner, ProtoNet
from fewshot.models import Conv4
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


def test_prediction_in_either_mode_leaves_the_running_statistics_unchanged():
    torch.manual_seed(0)
    encoder = Conv4(out_features=None, hidden=8, image_size=16, track_running_stats=True)
    for policy in ("transductive", "inductive"):
        protonet = ProtoNet(encoder, batch_norm=policy)
        protonet.training_step(conv_tasks())
        protonet.eval()
        before = {k: v.clone() for k, v in protonet.state_dict().items()}
        protonet.predict(conv_tasks(seed=3))
        assert all(torch.equal(v, protonet.state_dict()[k]) for k, v in before.items()), policy
