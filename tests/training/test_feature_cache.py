"""Features computed once for a backbone frozen whole: only where the backbone is a fixed
function of each image, and then training and evaluation give what recomputing gives."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from fewshot.backbones import BackboneNetwork, backbones_in, freeze
from fewshot.cli import main
from fewshot.training import checkpoint
from fewshot.training.evaluation import evaluate_episodes
from fewshot.training.feature_cache import cached_backbone, on_features, skipped
from fewshot.training.loading import load_run
from tests.conftest import write_random_image_folder
from tests.test_backbones import CONSTRUCTOR, folder_run, small_network, written_weights


class RandomDrop(nn.Module):
    """Drops whole examples at random in training, as drop-path does: no dropout module."""

    def forward(self, x):
        if not self.training:
            return x
        return x * (torch.rand(len(x), 1, 1, 1) > 0.5)


class Rows:
    """The least a sampler that `can_cache` has: rows of inputs and no transform."""

    inputs = torch.rand(6, 1, 16, 16)
    transform = None


SAMPLER = Rows()


def network(body: nn.Module, spec: str | None) -> BackboneNetwork:
    built = BackboneNetwork(body, 3, torch.zeros(2, 1, 16, 16))
    if spec:
        freeze(built, spec)
    return built


def test_only_a_backbone_frozen_whole_and_fixed_is_cached():
    from fewshot.backbones import mark_backbone

    cases = {
        "frozen whole": (small_network(), "backbone", True),
        "learning": (small_network(), None, False),
        "partly frozen": (small_network(), "0.,1.", False),
        "batch statistics": (
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
            "backbone",
            False,
        ),
        "dropout": (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5)), "backbone", False),
        "random in training": (nn.Sequential(nn.Conv2d(1, 4, 3), RandomDrop()), "backbone", False),
    }
    for name, (body, spec, cached) in cases.items():
        built = network(body, spec)
        mark_backbone(built)
        assert (cached_backbone(built, SAMPLER) is not None) == cached, name


def test_skipping_passes_features_through_and_puts_the_backbone_back():
    from fewshot.backbones import mark_backbone

    built = network(small_network(), "backbone")
    mark_backbone(built)
    x = torch.randn(5, 1, 16, 16)
    expected = built(x)
    features = built.backbone(x)
    with skipped(built):
        torch.testing.assert_close(built(features), expected)
        assert cached_backbone(built, SAMPLER) is None  # never cached twice
    torch.testing.assert_close(built(x), expected)
    assert set(built.state_dict()) == set(network(small_network(), "backbone").state_dict())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_random_image_folder(root, size=16)
    return root


@pytest.mark.slow
def test_cached_training_and_evaluation_equal_recomputing_to_float_rounding(tmp_path, images):
    written_weights(tmp_path / "w.safetensors")
    runs = {}
    for cache in ("--cache-features", "--no-cache-features"):
        out = tmp_path / cache
        args = folder_run(images, "--algorithm", "maml", "--backbone", CONSTRUCTOR, "--out", out)
        result = CliRunner().invoke(main, ["train", *map(str, args),
            "--backbone-weights", str(tmp_path / "w.safetensors"), "--freeze", "backbone",
            "--iterations", "10", "--val-every", "5", "--val-episodes", "4", cache,
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        noted = "features: the frozen backbone's, computed once for 28 images" in result.output
        assert noted == (cache == "--cache-features")
        runs[cache] = out
    cached, recomputed = (load_file(runs[c] / checkpoint.BEST_WEIGHTS) for c in runs)
    assert cached.keys() == recomputed.keys()
    for name in cached:
        torch.testing.assert_close(cached[name], recomputed[name], rtol=1e-4, atol=1e-5)
    losses = [
        [
            r["loss"]
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]
        for run in runs.values()
    ]
    assert losses[0] and losses[0] == pytest.approx(losses[1], rel=1e-4)
    config, algorithm, sources = load_run(runs["--cache-features"], trust_backbone=True)
    assert cached_backbone(algorithm, sources.test) is not None
    results = [
        evaluate_episodes(algorithm, sources.test, 20, cache_features=cache)[1]
        for cache in (True, False)
    ]
    torch.testing.assert_close(results[0], results[1])
    features = on_features(sources.test, next(backbones_in(algorithm)))
    assert features.inputs.shape == (len(sources.test.inputs), 8, 1, 1)


def test_checkpointed_maml_trains_alike_on_cached_features():
    """--checkpoint-inner splits the network into segments; skipped, the backbone is one."""
    from fewshot.tasks import Task
    from fewshot.training.config import TrainConfig
    from fewshot.training.factory import build_algorithm

    config = TrainConfig(
        algorithm="maml", dataset="omniglot", freeze="backbone",
        settings={"checkpoint_inner": True, "inner_steps": 2},
    ).resolved()  # fmt: skip
    torch.manual_seed(0)
    maml = build_algorithm(config)
    support_x, query_x = torch.rand(2, 5, 1, 28, 28), torch.rand(2, 10, 1, 28, 28)
    labels = torch.arange(5).expand(2, -1), torch.arange(5).repeat(2).expand(2, -1)
    maml.training_step(Task(support_x, labels[0], query_x, labels[1]))
    recomputed = [p.grad.clone() for p in maml.parameters() if p.requires_grad]
    maml.zero_grad()
    backbone = next(backbones_in(maml))
    with torch.no_grad():
        support_z = backbone(support_x.flatten(0, 1)).unflatten(0, (2, 5))
        query_z = backbone(query_x.flatten(0, 1)).unflatten(0, (2, 10))
    with skipped(maml):
        maml.training_step(Task(support_z, labels[0], query_z, labels[1]))
    cached = [p.grad for p in maml.parameters() if p.requires_grad]
    assert recomputed and len(recomputed) == len(cached)
    for a, b in zip(recomputed, cached):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
