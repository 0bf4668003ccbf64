"""Invariants of the N-way K-shot sampler, on synthetic data and on Omniglot's real splits."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fewshot import TaskSampler
from fewshot.cli import in_flags
from fewshot.datasets.omniglot import omniglot_split
from fewshot.errors import ConfigError, DataError


def labelled_data(num_classes=10, per_class=8, sizes=None):
    sizes = sizes or [per_class] * num_classes
    labels = torch.cat([torch.full((n,), 100 + c) for c, n in enumerate(sizes)])
    # Each input records its own class and its index within the class, so tests can trace it.
    within = torch.cat([torch.arange(n) for n in sizes])
    inputs = torch.stack([labels.float(), within.float()], dim=1)
    return inputs, labels


def check_episode_invariants(tasks, ways, shots, queries, inputs_to_label):
    t = len(tasks)
    assert tasks.support_x.shape[:2] == (t, ways * shots)
    assert tasks.query_x.shape[:2] == (t, ways * queries)
    for i in range(t):
        task = tasks[i]
        for y in (task.support_y, task.query_y):
            assert set(y.tolist()) == set(range(ways))
        # The remapped label is consistent with the original class, one class per label.
        support_classes = {inputs_to_label(x) for x in task.support_x}
        assert len(support_classes) == ways
        for x, y in zip(
            torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
        ):
            assert inputs_to_label(x) == inputs_to_label(task.support_x[task.support_y == y][0])
        # Support and query are disjoint examples.
        support = {tuple(x.tolist()) for x in task.support_x}
        query = {tuple(x.tolist()) for x in task.query_x}
        assert len(support) == ways * shots and len(query) == ways * queries
        assert not support & query


def test_episodes_have_remapped_labels_and_disjoint_support_and_query():
    inputs, labels = labelled_data()
    sampler = TaskSampler(inputs, labels, ways=5, shots=2, queries=3)
    tasks = sampler.sample(20, torch.Generator().manual_seed(0))
    check_episode_invariants(tasks, 5, 2, 3, lambda x: int(x[0]))


def test_same_seed_same_episodes_and_other_seed_other_episodes():
    inputs, labels = labelled_data()
    sampler = TaskSampler(inputs, labels, ways=5, shots=1, queries=2)
    a = sampler.sample(8, torch.Generator().manual_seed(3))
    b = sampler.sample(8, torch.Generator().manual_seed(3))
    c = sampler.sample(8, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert not torch.equal(a.support_x, c.support_x)


def test_every_class_and_every_example_gets_drawn():
    inputs, labels = labelled_data(num_classes=6, per_class=4)
    sampler = TaskSampler(inputs, labels, ways=2, shots=1, queries=1)
    tasks = sampler.sample(500, torch.Generator().manual_seed(0))
    seen = {tuple(x.tolist()) for x in torch.cat([tasks.support_x, tasks.query_x], 1).flatten(0, 1)}
    assert len(seen) == 24


def ordered_class_pair_counts(sampler, draws, tasks_per_call, generator):
    counts = torch.zeros(sampler.num_classes, sampler.num_classes)
    for _ in range(draws // tasks_per_call):
        tasks = sampler.sample(tasks_per_call, generator)
        first = tasks.support_x[:, 0, 0].long() - 100  # the class each input records
        second = tasks.support_x[:, 1, 0].long() - 100
        counts.index_put_((first, second), torch.ones(len(first)), accumulate=True)
    return counts


@pytest.mark.parametrize(
    "tasks_per_call",
    [1, 2, 40],  # one task and a few: n draws kept unless repeated; 40: keys over all classes
)
def test_class_draw_is_uniform_over_ordered_pairs_of_distinct_classes(tasks_per_call):
    """Both ways of drawing classes (rejection of repeated draws, and the largest of random
    keys) must give every ordered pair of distinct classes the same chance."""
    inputs, labels = labelled_data(num_classes=12, per_class=2)
    sampler = TaskSampler(inputs, labels, ways=2, shots=1, queries=1)
    generator = torch.Generator().manual_seed(0)
    counts = ordered_class_pair_counts(sampler, 26400, tasks_per_call, generator)
    off_diagonal = ~torch.eye(12, dtype=torch.bool)
    assert counts.diagonal().sum() == 0
    expected = 26400 / 132
    chi_square = float(((counts[off_diagonal] - expected) ** 2 / expected).sum())
    # 131 degrees of freedom: mean 131, standard deviation 16.2; a biased draw (e.g. one
    # class twice as likely) lands far above 131 + 6 * 16.2.
    assert chi_square < 228


def test_unequal_class_sizes_never_draw_beyond_a_class():
    inputs, labels = labelled_data(sizes=[3, 9, 4, 5])
    sampler = TaskSampler(inputs, labels, ways=4, shots=1, queries=2)
    tasks = sampler.sample(200, torch.Generator().manual_seed(0))
    check_episode_invariants(tasks[:20], 4, 1, 2, lambda x: int(x[0]))


def test_uint8_images_become_floats_in_unit_range():
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)
    sampler = TaskSampler(images, torch.arange(40) // 4, ways=3, shots=1, queries=1)
    x = sampler.sample(2).support_x
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ways=11, shots=1, queries=1), "`ways`=11 is larger than the 10 classes"),
        (dict(ways=1, shots=1, queries=1), "`ways`=1 makes episodes of one class.*set `ways` to 2"),
        (dict(ways=5, shots=5, queries=4), r"`shots` \+ `queries` = 9 is more than the 8 exa"),
        (dict(ways=0, shots=1, queries=1), "`ways` must be positive"),
        (dict(ways=5, shots=-1, queries=1), "`shots` must be positive"),
    ],
)
def test_impossible_requests_get_one_clear_error(kwargs, message):
    inputs, labels = labelled_data()
    with pytest.raises(ConfigError, match=message):
        TaskSampler(inputs, labels, **kwargs)


def test_messages_name_the_options_the_caller_gives():
    inputs, labels = labelled_data(num_classes=8)
    training = {"ways": "train_ways", "queries": "train_queries"}
    with pytest.raises(ConfigError) as refused:
        TaskSampler(inputs, labels, ways=60, shots=1, queries=1, option_names=training)
    assert str(refused.value) == (
        "`train_ways`=60 is larger than the 8 classes in this split; set `train_ways` to 8 or "
        "fewer."
    )
    assert in_flags(str(refused.value)).startswith("--train-ways=60 is larger than the 8")
    with pytest.raises(ConfigError, match=r"lower `shots` or `train_queries`\.$"):
        TaskSampler(inputs, labels, ways=5, shots=4, queries=5, option_names=training)


def test_data_of_one_class_is_refused():
    inputs, labels = labelled_data(num_classes=1)
    with pytest.raises(DataError, match="has 1 class.*needs at least 2"):
        TaskSampler(inputs, labels, ways=2, shots=1, queries=1)


@settings(max_examples=60, deadline=None)
@given(
    num_classes=st.integers(1, 12),
    per_class=st.integers(1, 8),
    ways=st.integers(-1, 14),
    shots=st.integers(-1, 6),
    queries=st.integers(-1, 6),
    seed=st.integers(0, 2**31),
)
def test_sampler_invariants_or_clear_error_for_any_sizes(
    num_classes, per_class, ways, shots, queries, seed
):
    inputs, labels = labelled_data(num_classes, per_class)
    valid = ways > 1 and shots > 0 and queries > 0 and ways <= num_classes
    valid = valid and shots + queries <= per_class
    if not valid:
        with pytest.raises((ConfigError, DataError)):
            TaskSampler(inputs, labels, ways, shots, queries)
        return
    tasks = TaskSampler(inputs, labels, ways, shots, queries).sample(
        3, torch.Generator().manual_seed(seed)
    )
    check_episode_invariants(tasks, ways, shots, queries, lambda x: int(x[0]))


@pytest.mark.omniglot
def test_omniglot_episodes_only_use_their_splits_classes(omniglot):
    """Trace every drawn image back to its character: test episodes use test characters only."""
    images, labels = omniglot_split(omniglot, "vinyals", "test", rotations=False)
    test_images = {img.numpy().tobytes() for img in images}
    train_images, _ = omniglot_split(omniglot, "vinyals", "train", rotations=False)
    train_set = {img.numpy().tobytes() for img in train_images}
    sampler = TaskSampler(images, labels, ways=5, shots=1, queries=15)
    tasks = sampler.sample(50, torch.Generator().manual_seed(0))
    drawn = torch.cat([tasks.support_x, tasks.query_x], 1).flatten(0, 1)
    drawn_bytes = {(x * 255).round().to(torch.uint8).numpy().tobytes() for x in drawn}
    assert drawn_bytes <= test_images
    assert not drawn_bytes & train_set


def test_example_batches_draw_every_class_with_dataset_wide_labels():
    from fewshot import ExampleSampler

    inputs, labels = labelled_data(num_classes=6, per_class=5)
    ids = labels * 7 + 3  # class ids need not be contiguous
    sampler = ExampleSampler(inputs, ids)
    assert sampler.num_classes == 6
    batch = sampler.sample(600, torch.Generator().manual_seed(0))
    assert batch.x.shape == (600, *inputs.shape[1:]) and batch.x.dtype == torch.float32
    assert set(batch.y.tolist()) == set(range(6))
    # each example keeps its class: label k is the k-th smallest id (inputs record 100 + k)
    assert torch.equal(batch.y, batch.x[:, 0].long() - 100)
    again = sampler.sample(600, torch.Generator().manual_seed(0))
    assert torch.equal(again.x, batch.x) and torch.equal(again.y, batch.y)
