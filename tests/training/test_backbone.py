"""--backbone and --checkpoint-inner: resolved, recorded, refused where they do not apply."""

import pytest
from click.testing import CliRunner

from fewshot.cli import main
from fewshot.errors import ConfigError
from fewshot.models import Conv4, ResNet12
from fewshot.training.config import TrainConfig
from fewshot.training.factory import build_algorithm


def test_images_default_to_conv4_and_record_it():
    config = TrainConfig(algorithm="maml", dataset="omniglot").resolved()
    assert config.backbone == "conv4" and config.to_dict()["backbone"] == "conv4"
    assert isinstance(build_algorithm(config).model, Conv4)
    assert not build_algorithm(config).checkpoint_inner


def test_a_run_written_before_the_option_is_conv4():
    document = TrainConfig(algorithm="maml", dataset="omniglot").resolved().to_dict()
    del document["backbone"], document["checkpoint_inner"]
    config = TrainConfig.from_dict(document)
    assert config.backbone is None and config.problem.backbone == "conv4"
    assert isinstance(build_algorithm(config.resolved()).model, Conv4)


def test_resnet12_is_built_for_every_method_with_the_literatures_network():
    config = TrainConfig(
        algorithm="maml",
        dataset="omniglot",
        backbone="resnet12",
        settings={"checkpoint_inner": True},
    ).resolved()
    learner = build_algorithm(config)
    assert isinstance(learner.model, ResNet12) and learner.checkpoint_inner
    assert learner.model.features[0].conv1.in_channels == 1
    round_trip = TrainConfig.from_dict(config.to_dict()).resolved()
    assert round_trip.backbone == "resnet12" and round_trip.settings.checkpoint_inner
    encoder = build_algorithm(
        TrainConfig(algorithm="protonet", dataset="omniglot", backbone="resnet12-narrow").resolved()
    ).encoder
    assert isinstance(encoder, ResNet12) and encoder.embedding_size == 512


def test_conv4_32_is_finns_miniimagenet_network():
    """32 filters per layer (Finn et al. 2017, sec. 5.2): 800 features at 84x84 (32 x 5 x 5)."""
    config = TrainConfig(algorithm="maml", dataset="omniglot", backbone="conv4-32").resolved()
    model = build_algorithm(config).model
    assert isinstance(model, Conv4)
    assert [block[0].out_channels for block in model.features[:4]] == [32] * 4
    assert Conv4(3, 5, hidden=32, image_size=84).head.in_features == 800
    assert TrainConfig.from_dict(config.to_dict()).resolved().backbone == "conv4-32"


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(dataset="sinusoid", backbone="resnet12"), "`backbone` applies to"),
        (dict(dataset="omniglot", backbone="resnet18"), "unknown backbone 'resnet18'"),
    ],
)
def test_backbones_that_do_not_apply_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(algorithm="maml", **values).resolved()


def test_relation_networks_keep_their_own_embedding_module():
    config = TrainConfig(algorithm="relationnet", dataset="omniglot", backbone="resnet12")
    with pytest.raises(ConfigError, match="drop `backbone`"):
        build_algorithm(config.resolved())


def test_the_command_line_offers_both_options():
    output = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "--backbone TEXT" in output
    assert all(name in output for name in ("conv4-32", "resnet12-narrow", "package.module:call"))
    assert "--checkpoint-inner / --no-checkpoint-inner" in output
