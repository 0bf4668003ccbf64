"""Meta-Dataset's episodes follow the paper's distributions of ways, queries, support sizes and
shots (chi-square tests on seeded draws), and hold what they say."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import scipy.stats
import torch
from click.testing import CliRunner

from fewshot.cli import main
from fewshot.datasets.omniglot import alphabet_groups, omniglot_split
from fewshot.episodes import MetaDatasetSampler
from fewshot.errors import ConfigError
from fewshot.training.checkpoint import read_metrics

ZOO = Path(__file__).parent.parent / "zoo"

DRAWS = 3000
P_FLOOR = 1e-3  # a seeded draw below this would be a real departure, not chance


def dataset(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose value names their class and index, labels in a shuffled order."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    inputs = torch.stack([labels.float(), torch.arange(len(labels)).float()], dim=1)
    return inputs, labels


def shapes(sampler: MetaDatasetSampler, draws: int = DRAWS, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [sampler.describe(generator) for _ in range(draws)]


def assert_uniform(values: list[int], support: range) -> None:
    counts = Counter(values)
    assert set(counts) <= set(support), set(counts) - set(support)
    observed = [counts[v] for v in support]
    assert scipy.stats.chisquare(observed).pvalue > P_FLOOR, observed


def test_ways_are_uniform_between_five_and_the_classes_available():
    sampler = MetaDatasetSampler(*dataset([20] * 30))
    assert_uniform([s.ways for s in shapes(sampler)], range(5, 31))


def test_ways_stop_at_fifty_where_there_are_more_classes():
    sampler = MetaDatasetSampler(*dataset([4] * 80), max_support=500)
    assert_uniform([s.ways for s in shapes(sampler, 2000)], range(5, 51))


def test_classes_are_drawn_uniformly_without_replacement():
    sampler = MetaDatasetSampler(*dataset([20] * 12))
    drawn = shapes(sampler)
    assert all(len(set(s.classes)) == s.ways for s in drawn)
    # each class's share of the picks is 1/12
    assert_uniform([c for s in drawn for c in s.classes], range(12))


def test_with_groups_every_episode_is_one_group_and_groups_are_drawn_uniformly():
    """Omniglot's alphabets: groups of 6, 9 and 40 classes (and one of 3, too small for 5 ways,
    never drawn); ways range up to the group's size."""
    group_sizes = [6, 9, 40, 3]
    groups = torch.cat([torch.full((n,), g) for g, n in enumerate(group_sizes)])
    sampler = MetaDatasetSampler(*dataset([20] * len(groups)), groups=groups)
    drawn = shapes(sampler)
    episode_groups = []
    for s in drawn:
        (group,) = set(groups[s.classes].tolist())
        episode_groups.append(group)
        assert 5 <= s.ways <= group_sizes[group]
    assert_uniform(episode_groups, range(3))
    big = [s.ways for s, g in zip(drawn, episode_groups) if g == 2]
    assert_uniform(big, range(5, 41))


def test_queries_are_half_the_smallest_class_up_to_ten_and_balanced():
    sizes = [4, 7, 30, 31, 50, 21, 9, 40]
    sampler = MetaDatasetSampler(*dataset(sizes), min_ways=2, max_ways=8)
    for s in shapes(sampler, 500):
        assert s.queries == min(10, min(sizes[c] for c in s.classes) // 2)
        assert all(1 <= k <= sizes[c] - s.queries for c, k in zip(s.classes, s.shots))


def test_the_support_size_is_uniform_per_class_before_the_cap():
    """Classes of 20 examples give q = 10 and 10 remaining each, so with N ways the support
    size is S = N * floor(beta * 10 + 1), beta uniform: N times a uniform draw of 1..10; the
    shots sum to S at most and to N at least."""
    sampler = MetaDatasetSampler(*dataset([20] * 10))
    per_class = []
    for s in shapes(sampler):
        assert s.support_size % s.ways == 0
        assert s.ways <= sum(s.shots) <= s.support_size
        per_class.append(s.support_size // s.ways)
    assert_uniform(per_class, range(1, 11))


def test_a_class_contributes_at_most_a_hundred_to_the_support_size():
    """Two classes of 300 examples (q = 10): each adds floor(beta * 100 + 1), so S <= 200."""
    sampler = MetaDatasetSampler(*dataset([300] * 2), min_ways=2, max_ways=2)
    sizes = [s.support_size for s in shapes(sampler, 2000)]
    assert max(sizes) <= 200 and max(sizes) > 190
    assert_uniform([size // 2 for size in sizes], range(1, 101))


def test_the_support_size_is_capped_at_five_hundred():
    """Classes of 300 examples: each contributes up to 100, so 50 ways could ask for 5,000."""
    sampler = MetaDatasetSampler(*dataset([300] * 60))
    sizes = [s.support_size for s in shapes(sampler, 500)]
    assert max(sizes) == 500 and min(sizes) >= 5


def test_shots_follow_class_sizes_with_noise_of_at_most_a_factor_four():
    """alpha_c is proportional to n_c * exp(w_c), w_c in [log 1/2, log 2]: between equal classes
    the weights differ by at most 4, so K_max - 1 < 4 K_min; classes of 80 examples get about
    twice the shots of classes of 40 (before the cap of 100 per class)."""
    sizes = [40] * 5 + [80] * 5
    sampler = MetaDatasetSampler(*dataset(sizes), max_ways=10, min_ways=10)
    big, small, unequal = [], [], 0
    for s in shapes(sampler, 1000):
        by_size = {40: [], 80: []}
        for c, k in zip(s.classes, s.shots):
            by_size[sizes[c]].append(k)
        for same in by_size.values():
            assert max(same) - 1 < 4 * min(same)
            unequal += len(set(same)) > 1
        if sum(s.shots) > 200:  # enough shots for the proportions to show
            big += by_size[80]
            small += by_size[40]
    assert unequal > 1000  # imbalanced support sets are the rule
    ratio = (sum(big) / len(big)) / (sum(small) / len(small))
    assert 1.8 < ratio < 2.2, ratio


def test_an_episode_holds_distinct_examples_of_its_classes_labelled_in_draw_order():
    sizes = [12, 15, 20, 9, 30, 11]
    inputs, labels = dataset(sizes)
    sampler = MetaDatasetSampler(inputs, labels, min_ways=3, max_ways=6)
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        state = generator.get_state()
        shape = sampler.describe(generator)
        generator.set_state(state)
        task = sampler.sample(1, generator)
        support_x, support_y, query_x, query_y = (t[0] for t in task.tensors())
        assert support_y.tolist() == [i for i, k in enumerate(shape.shots) for _ in range(k)]
        assert query_y.tolist() == [i for i in range(shape.ways) for _ in range(shape.queries)]
        x = torch.cat([support_x, query_x])
        y = torch.cat([support_y, query_y])
        assert len(set(x[:, 1].tolist())) == len(x)  # no example twice
        assert x[:, 0].tolist() == [float(shape.classes[i]) for i in y.tolist()]


def test_the_same_seed_gives_the_same_episodes_and_another_seed_others():
    sampler = MetaDatasetSampler(*dataset([20] * 30))
    assert shapes(sampler, 20, seed=1) == shapes(sampler, 20, seed=1)
    assert shapes(sampler, 20, seed=1) != shapes(sampler, 20, seed=2)


def test_the_inputs_are_not_copied():
    inputs, labels = dataset([20] * 10)
    assert MetaDatasetSampler(inputs, labels).inputs is inputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_ways": 1}, "2 <= min_ways <= max_ways"),
        ({"max_support": 10}, "must allow one shot per way"),
        (
            {"groups": torch.zeros(10, dtype=torch.long), "min_ways": 11, "max_ways": 20},
            "no group has 11 classes",
        ),  # fmt: skip
    ],
)
def test_impossible_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MetaDatasetSampler(*dataset([20] * 10), **kwargs)


def test_more_than_one_episode_at_once_is_refused():
    with pytest.raises(ConfigError, match="one at a time"):
        MetaDatasetSampler(*dataset([20] * 10)).sample(2)


@pytest.mark.omniglot
def test_omniglot_classes_are_grouped_by_their_alphabet_rotations_included(omniglot):
    images, labels = omniglot_split(omniglot, "vinyals", "test")
    groups = alphabet_groups(omniglot, labels, "vinyals")
    classes = torch.unique(labels)
    alphabets = sorted({omniglot.names[c // 4].split("/")[1] for c in classes.tolist()})
    assert len(groups) == len(classes) and int(groups.max()) + 1 == len(alphabets)
    for position in torch.randperm(len(classes), generator=torch.Generator().manual_seed(0))[:50]:
        character = omniglot.names[int(classes[position]) // 4]
        assert alphabets[int(groups[position])] == character.split("/")[1]
    sampler = MetaDatasetSampler(images, labels, groups)
    for shape in shapes(sampler, 50):
        assert len(set(groups[shape.classes].tolist())) == 1


@pytest.mark.omniglot
@pytest.mark.slow
def test_fewshot_eval_scores_a_zoo_model_on_meta_dataset_episodes(omniglot_root):
    run = ["eval", str(ZOO / "protonet-omniglot-5w1s"), "--data-root", str(omniglot_root)]
    result = CliRunner().invoke(main, [*run, "--sampler", "meta-dataset", "--episodes", "4",
                                       "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["sampler"] == "meta-dataset" and report["episodes"] == 4
    assert report["ways"] is None and 0 < report["accuracy"] <= 1


@pytest.mark.parametrize(
    "run, extra, message",
    [
        ("maml-omniglot-5w1s-cpu", [], "model has a 5-way head; evaluate a method without"),
        ("protonet-omniglot-5w1s", ["--shots", "5"], "drop --shots"),
    ],
)
def test_meta_dataset_episodes_a_model_cannot_answer_are_refused_in_one_line(
    run, extra, message, omniglot_root
):
    arguments = ["eval", str(ZOO / run), "--data-root", str(omniglot_root)]
    arguments += ["--sampler", "meta-dataset", "--episodes", "4", *extra]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert message in result.output, result.output


@pytest.mark.omniglot
@pytest.mark.slow
def test_a_metric_method_trains_validates_and_is_tested_on_meta_dataset_episodes(
    tmp_path, omniglot_root
):
    out = tmp_path / "proto-md"
    quick = ["--iterations", "6", "--val-every", "3", "--val-episodes", "3", "--test-episodes", "3"]
    result = CliRunner().invoke(main, [
        "train", "--algorithm", "protonet", "--dataset", "omniglot", "--data-root",
        str(omniglot_root), "--sampler", "meta-dataset", *quick, "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["sampler"] == "meta-dataset"
    validations = [r for r in read_metrics(out) if r.get("split") == "val"]
    assert [r["iteration"] for r in validations] == [3, 6]
    assert all(r["episodes"] == 3 and 0 <= r["accuracy"] <= 1 for r in validations)
    # fewshot eval takes the run's episodes unless told: Meta-Dataset's, or fixed ones
    run = ["eval", str(out), "--episodes", "3", "--json"]
    own = json.loads(CliRunner().invoke(main, run).output)
    fixed = json.loads(CliRunner().invoke(main, [*run, "--sampler", "fixed"]).output)
    assert own["sampler"] == "meta-dataset" and own["ways"] is None
    assert "sampler" not in fixed and (fixed["ways"], fixed["shots"]) == (5, 1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "omniglot", "--algorithm", "maml"], "maml's model has one output per way"),
        (
            ["--dataset", "omniglot", "--algorithm", "protonet", "--meta-batch", "2"],
            "use --meta-batch 1",
        ),  # fmt: skip
        (["--dataset", "sinusoid"], "--sampler applies to --dataset"),
        (["--dataset", "omniglot", "--algorithm", "protonet", "--shots", "5"], "drop --shots"),
    ],
)
def test_training_on_meta_dataset_episodes_refuses_what_cannot_work(tmp_path, args, message):
    command = ["train", *args, "--sampler", "meta-dataset", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert message in result.output, result.output
    assert not (tmp_path / "run").exists()
