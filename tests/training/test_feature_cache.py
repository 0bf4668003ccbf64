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
    }
    for name, (body, spec, cached) in cases.items():
        built = network(body, spec)
        mark_backbone(built)
        assert (cached_backbone(built) is not None) == cached, name


def test_skipping_passes_features_through_and_puts_the_backbone_back():
    from fewshot.backbones import mark_backbone

    built = network(small_network(), "backbone")
    mark_backbone(built)
    x = torch.randn(5, 1, 16, 16)
    expected = built(x)
    features = built.backbone(x)
    with skipped(built.backbone, built):
        torch.testing.assert_close(built(features), expected)
        assert cached_backbone(built) is None  # never cached twice
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
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    config, algorithm, sources = load_run(runs["--cache-features"], trust_backbone=True)
    assert cached_backbone(algorithm) is not None
    results = [
        evaluate_episodes(algorithm, sources.test, 20, cache_features=cache)[1]
        for cache in (True, False)
    ]
    torch.testing.assert_close(results[0], results[1])
    features = on_features(sources.test, next(backbones_in(algorithm)))
    assert features.inputs.shape == (len(sources.test.inputs), 8, 1, 1)
