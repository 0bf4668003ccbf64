"""Relation Networks: the relation score of a pair by hand, class maps summed over shots, the
MSE-to-one-hot training loss, and the paper's Omniglot shapes."""

import torch
import torch.nn.functional as F

from fewshot import RelationNet, Task
from fewshot.models import RelationEncoder


def tiny_relation_net(seed=0, pooling="sum"):
    torch.manual_seed(seed)
    encoder = RelationEncoder(hidden=4, image_size=28)
    return RelationNet(encoder, encoder.output_shape, hidden=3, support_pooling=pooling)


def image_task(ways=3, shots=2, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Task(
        torch.rand(1, ways * shots, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(shots).unsqueeze(0),
        torch.rand(1, ways * queries, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(queries).unsqueeze(0),
    )


def relation_by_hand(net, class_map, query_map):
    """sigmoid(fc2(relu(fc1(conv blocks([class map, query map]))))) for one pair."""
    pair = torch.cat([class_map, query_map]).unsqueeze(0)  # the class's channels first
    x = net.relation.features(pair).flatten(1)
    return torch.sigmoid(net.relation.fc2(F.relu(net.relation.fc1(x))))[0, 0]


def test_the_paper_shapes_for_omniglot():
    encoder = RelationEncoder()
    assert encoder.output_shape == (64, 5, 5)
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 64, 5, 5)
    assert RelationNet(encoder, encoder.output_shape).relation.fc1.in_features == 64


def test_relation_score_of_a_pair_compares_summed_class_maps_with_the_query_map():
    net = tiny_relation_net().eval()
    task = image_task(shots=2)
    scores = net.predict(task)[0]
    with torch.no_grad():
        maps = net.encoder(task.support_x[0])
        queries = net.encoder(task.query_x[0])
        for q in range(len(queries)):
            for k in range(3):
                class_map = maps[2 * k] + maps[2 * k + 1]
                expected = relation_by_hand(net, class_map, queries[q])
                torch.testing.assert_close(scores[q, k], expected)
    assert ((scores > 0) & (scores < 1)).all()


def test_mean_pooling_compares_the_mean_class_map_and_equals_the_sum_at_one_shot():
    net = tiny_relation_net(pooling="mean").eval()
    task = image_task(shots=3)
    scores = net.predict(task)[0]
    with torch.no_grad():
        maps, queries = net.encoder(task.support_x[0]), net.encoder(task.query_x[0])
        for q in range(len(queries)):
            for k in range(3):
                class_map = (maps[3 * k] + maps[3 * k + 1] + maps[3 * k + 2]) / 3
                torch.testing.assert_close(
                    scores[q, k], relation_by_hand(net, class_map, queries[q])
                )
    one_shot = image_task(shots=1)
    summed = tiny_relation_net(pooling="sum").eval()
    assert torch.equal(net.predict(one_shot), summed.predict(one_shot))


def test_training_regresses_scores_to_one_hot_labels_with_mse():
    net = tiny_relation_net()
    task = image_task()
    loss, scores = net._loss_and_logits(task)
    one_hot = F.one_hot(task.query_y, 3).to(scores.dtype)
    torch.testing.assert_close(loss, ((scores - one_hot) ** 2).mean())


def test_inductive_batch_norm_covers_the_relation_module():
    """Inductive: each query's scores are independent of the other queries, through the
    encoder's and the relation module's batch norm alike; transductive: they are not."""
    task = image_task()
    others = task.query_x.clone()
    others[:, 1:] = torch.rand(others[:, 1:].shape)
    changed = Task(task.support_x, task.support_y, others, task.query_y)
    for policy, independent in (("inductive", True), ("transductive", False)):
        net = tiny_relation_net()
        net.batch_norm = policy
        net.training_step(image_task(seed=1))  # running statistics away from their start
        net.eval()
        same = torch.allclose(net.predict(task)[:, 0], net.predict(changed)[:, 0])
        assert same == independent
        running = net.relation.features[0][1].running_mean.clone()
        net.predict(task)
        assert torch.equal(net.relation.features[0][1].running_mean, running)  # not updated
