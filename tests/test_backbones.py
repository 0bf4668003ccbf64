"""Backbones from outside: a constructor's network, weights files, frozen parts, and the trust
that loading a run built by a constructor asks for."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import fewshot
from fewshot.algorithms import METHODS
from fewshot.backbones import (
    BackboneNetwork,
    FrozenBatchNorm,
    backbones_in,
    freeze,
    load_backbone_weights,
    start_from_weights,
)
from fewshot.cli import main
from fewshot.errors import ConfigError
from fewshot.models import Conv4
from fewshot.training import checkpoint
from fewshot.training.config import TrainConfig
from fewshot.training.factory import build_algorithm
from tests.conftest import write_random_image_folder

CONSTRUCTOR = "tests.test_backbones:small_network"


def small_network(width: int = 8, in_channels: int = 1) -> nn.Module:
    """The constructor the tests name: two conv blocks that keep batch-norm statistics, then
    global average pooling (an embedding of `width` features)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    )


def not_a_network() -> int:
    return 3


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_random_image_folder(root, size=16)
    return root


def folder_run(images: Path, *extra) -> list:
    """`fewshot train` arguments of a few iterations on the random image folder."""
    return [
        "--dataset", "folder", "--data-root", images, "--image-size", "16", "--ways", "3",
        "--shots", "1", "--queries", "2", "--train-ways", "3", "--train-queries", "2",
        "--iterations", "3", "--val-every", "3",
        "--val-episodes", "2", "--test-episodes", "0", *extra,
    ]  # fmt: skip


def written_weights(path: Path, width: int = 8, prefix: str = "") -> dict[str, torch.Tensor]:
    """A random `small_network`'s state dict, saved to `path` (safetensors or torch.save) with
    `prefix` before every key; returned without it."""
    torch.manual_seed(7)
    network = small_network(width)
    with torch.no_grad():  # statistics a pretraining would have left, not the initial ones
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    stored = {prefix + k: v for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(stored, path)
    else:
        torch.save({"state_dict": stored}, path)
    return state


# The network


def test_a_constructor_builds_the_backbone_and_its_feature_size_is_read_off_it():
    config = TrainConfig(
        algorithm="protonet", dataset="omniglot", backbone=CONSTRUCTOR, backbone_args={"width": 6}
    ).resolved()
    encoder = build_algorithm(config).encoder
    assert isinstance(encoder, BackboneNetwork) and encoder.embedding_size == 6
    assert encoder(torch.zeros(4, 1, 28, 28)).shape == (4, 6)
    maml = TrainConfig(
        algorithm="maml", dataset="omniglot", backbone=CONSTRUCTOR, backbone_args={"width": 6}
    )
    model = build_algorithm(maml.resolved()).model
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5


def test_a_constructor_file_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())\n"
    )
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(algorithm="protonet", dataset="omniglot", backbone="mine.py:net")
    resolved = config.resolved()
    assert resolved.backbone == f"{tmp_path / 'mine.py'}:net"
    assert build_algorithm(resolved).encoder.embedding_size == 4 * 26 * 26


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(backbone="tests.test_backbones:nothing"), "has no callable nothing"),
        (dict(backbone="no_such_module_here:net"), "cannot import no_such_module_here"),
        (dict(backbone="/nowhere/net.py:net"), "there is no file /nowhere/net.py"),
        (dict(backbone="tests.test_backbones:not_a_network"), "returned a int, not a module"),
        (dict(backbone=CONSTRUCTOR, backbone_args={"depth": 3}), "unexpected keyword"),
        (dict(backbone=CONSTRUCTOR, backbone_args={"in_channels": 3}), "cannot take inputs"),
        (dict(backbone="conv4", backbone_args={"width": 3}), "`backbone_args` are a construc"),
        (dict(weights_prefix="module."), "`weights_prefix` applies to `backbone_weights`"),
        (dict(backbone_weights="w.pt", init="RUN"), "`init` or from `backbone_weights`"),
        (dict(backbone="resnet18"), "or name a constructor as package.module:callable"),
    ],
)
def test_a_backbone_that_cannot_be_built_is_one_line(values, message):
    with pytest.raises(ConfigError, match=message) as error:
        build_algorithm(TrainConfig(algorithm="protonet", dataset="omniglot", **values).resolved())
    assert "\n" not in str(error.value)


def test_backbone_settings_are_refused_for_data_without_images():
    with pytest.raises(ConfigError, match="`freeze` applies to `dataset`"):
        TrainConfig(algorithm="maml", dataset="sinusoid", freeze="backbone").resolved()


# Weights files


def test_weights_load_bitwise_from_safetensors_and_from_a_state_dict_with_a_prefix(tmp_path):
    for path, prefix in ((tmp_path / "w.safetensors", ""), (tmp_path / "w.pt", "module.")):
        state = written_weights(path, prefix=prefix)
        network = small_network()
        load_backbone_weights(network, path, prefix or None)
        assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items())
    added = tmp_path / "bare.safetensors"
    state = written_weights(added)
    wrapped = nn.Sequential(small_network())  # its keys are the file's with "0." before them
    load_backbone_weights(wrapped, added, "+0.")
    assert all(torch.equal(wrapped.state_dict()["0." + k], v) for k, v in state.items())


def test_each_weights_fault_is_one_line_that_names_it(tmp_path):
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "partial.pt")
    torch.save(small_network(), tmp_path / "module.pt")  # a pickled module: refused
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    written_weights(tmp_path / "prefixed.pt", prefix="module.")
    written_weights(tmp_path / "narrow.safetensors", width=4)
    cases = {
        "prefixed.pt": "give `weights_prefix=module.` to strip their prefix",
        "narrow.safetensors": re.escape("0.bias is (4,) in the file and (8,) in the backbone (and"),
        "module.pt": "holds pickled objects besides tensors, which are never loaded",
        "junk.pt": "is neither safetensors nor a file torch.save wrote",
        "junk.safetensors": "is not a safetensors file",
        "missing.safetensors": "there is no such file",
        "partial.pt": re.escape("keys 11 missing (0.bias, 1.weight, 1.bias, 1.running_mean, ..."),
    }
    for name, message in cases.items():
        network = small_network()
        before = {k: v.clone() for k, v in network.state_dict().items()}
        with pytest.raises(ConfigError, match=message) as error:
            load_backbone_weights(network, tmp_path / name)
        assert "\n" not in str(error.value), name
        assert all(torch.equal(network.state_dict()[k], v) for k, v in before.items()), name
    with pytest.raises(ConfigError, match="no key of the weights file starts with `weights_pre"):
        load_backbone_weights(small_network(), tmp_path / "prefixed.pt", "backbone.")


def test_pickled_code_in_a_weights_file_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"0.weight": Payload()}, tmp_path / "evil.pt")  # as torch.save writes code
    with pytest.raises(ConfigError, match="pickled objects"):
        load_backbone_weights(small_network(), tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_new_run_starts_from_the_weights_in_every_backbone_its_method_holds(tmp_path):
    state = written_weights(tmp_path / "w.safetensors")
    config = TrainConfig(algorithm="protonet", dataset="omniglot", backbone=CONSTRUCTOR)
    algorithm = build_algorithm(config.resolved())
    start_from_weights(algorithm, tmp_path / "w.safetensors")
    backbones = list(backbones_in(algorithm))
    assert len(backbones) == 1
    assert all(torch.equal(backbones[0].state_dict()[k], v) for k, v in state.items())
    relationnet = build_algorithm(
        TrainConfig(algorithm="relationnet", dataset="omniglot").resolved()
    )
    with pytest.raises(ConfigError, match="no backbone to load `backbone_weights` into"):
        start_from_weights(relationnet, tmp_path / "w.safetensors")


# Freezing


def test_freeze_backbone_fixes_parameters_and_statistics_and_leaves_the_head():
    network = BackboneNetwork(small_network(), 5, torch.zeros(2, 1, 16, 16))
    freeze(network, "backbone")
    assert not any(p.requires_grad for p in network.backbone.parameters())
    assert all(p.requires_grad for p in network.head.parameters())
    norms = [m for m in network.modules() if isinstance(m, FrozenBatchNorm)]
    assert len(norms) == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    network.train()
    x = torch.randn(6, 1, 16, 16)
    norm = network.backbone[1]
    expected = (network.backbone[0](x) - norm.running_mean[:, None, None]) / torch.sqrt(
        norm.running_var[:, None, None] + norm.eps
    ) * norm.weight[:, None, None] + norm.bias[:, None, None]
    torch.testing.assert_close(norm(network.backbone[0](x)), expected)  # training mode alike


def test_freeze_by_prefix_and_but_last_and_batch_norm_pick_their_parts():
    def fresh():
        return BackboneNetwork(small_network(), 5, torch.zeros(2, 1, 16, 16))

    network = fresh()
    freeze(network, "0.,1.")
    frozen = {n for n, p in network.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert isinstance(network.backbone[1], FrozenBatchNorm)
    assert isinstance(network.backbone[5], nn.BatchNorm2d)
    network = fresh()
    freeze(network, "backbone-but-last")  # children with parameters: 0, 1, 4, 5
    frozen = {n for n, p in network.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"}
    network = fresh()
    freeze(network, "batch-norm")
    assert all(p.requires_grad for p in network.parameters())
    assert all(isinstance(network.backbone[i], FrozenBatchNorm) for i in (1, 5))
    with pytest.raises(ConfigError, match="9. names no parameter of the backbone"):
        freeze(fresh(), "9.")
    with pytest.raises(ConfigError, match="keeps no running statistics"):
        freeze(Conv4(track_running_stats=False), "batch-norm")


def test_a_frozen_networks_state_dict_keeps_its_names():
    network = BackboneNetwork(small_network(), 5, torch.zeros(2, 1, 16, 16))
    names = set(network.state_dict())
    freeze(network, "backbone")
    assert set(network.state_dict()) == names


TRAINED_METHODS = [name for name in METHODS if name != "relationnet"]
# The metric methods learn only their backbone: freezing all of it leaves nothing to learn.
FROZEN = {"protonet": "0.,1.", "matchingnet": "0.,1."}


@pytest.mark.slow
@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_a_frozen_backbone_is_bitwise_unchanged_by_training(tmp_path, images, method):
    """Every method that builds on the run's network (all but relationnet, which builds its
    own) trains from the weights file and leaves the frozen part as the file holds it:
    parameters and, where the method keeps them, batch-norm statistics."""
    state = written_weights(tmp_path / "w.safetensors")
    frozen = FROZEN.get(method, "backbone")
    prefixes = ("",) if frozen == "backbone" else tuple(frozen.split(","))
    fine_tuning = (
        ["--finetune-epochs", "1"] if method in ("baseline", "baseline++", "finetune") else []
    )
    out = tmp_path / "run"
    args = folder_run(images, "--algorithm", method, "--backbone", CONSTRUCTOR, "--out", out)
    result = run(
        "train", *args, "--backbone-weights", tmp_path / "w.safetensors", "--freeze", frozen,
        *fine_tuning,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    trained = fewshot.load(out, batch_norm=None, trust_backbone=True)  # its best weights
    compared = 0
    for backbone in backbones_in(trained):
        for key, tensor in backbone.state_dict().items():
            if key in state and key.startswith(prefixes):
                assert torch.equal(tensor, state[key]), (method, key)
                compared += 1
    assert compared >= 2  # a frozen convolution's weight and bias, at least
    config = json.loads((out / "config.json").read_text())
    assert config["freeze"] == frozen
    assert config["backbone_weights"] == str(tmp_path / "w.safetensors")


@pytest.mark.slow
def test_freezing_all_a_metric_method_learns_is_refused_before_anything_is_written(
    tmp_path, images
):
    out = tmp_path / "run"
    args = folder_run(images, "--algorithm", "protonet", "--backbone", CONSTRUCTOR, "--out", out)
    result = run("train", *args, "--freeze", "backbone")
    assert result.exit_code == 2 and "leaves protonet nothing to learn" in result.output
    assert not out.exists()


def test_relationnet_refuses_a_backbone_it_does_not_build():
    with pytest.raises(ConfigError, match="relationnet"):
        build_algorithm(
            TrainConfig(algorithm="relationnet", dataset="omniglot", freeze="backbone").resolved()
        )


# Trust


EVIL = """\
from pathlib import Path
Path({marker!r}).write_text("imported")
from torch import nn
def net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
"""


@pytest.mark.slow
def test_a_run_built_by_a_constructor_loads_only_when_trusted(tmp_path, images):
    """A run folder whose config names a module that writes a file when imported: nothing is
    written by any loading path without the flag; with it, the run loads."""
    marker = tmp_path / "imported.txt"
    module = tmp_path / "evil.py"
    module.write_text(EVIL.format(marker=str(marker)))
    out = tmp_path / "run"
    args = folder_run(images, "--algorithm", "protonet", "--backbone", f"{module}:net")
    trained = run("train", *args, "--out", out, "--iterations", "2")
    assert trained.exit_code == 0, trained.output  # naming it in train is the consent
    marker.unlink()
    for name in [n for n in sys.modules if n.startswith("fewshot_backbone_")]:
        del sys.modules[name]  # as in a new process: loading would import it again
    support = images / "train"
    refused = {
        "eval": run("eval", out, "--episodes", "2"),
        "compare": run("compare", out, out, "--episodes", "2"),
        "adapt": run("adapt", out, "--support", support, next(support.glob("c0/*.png"))),
        "resume": run("train", "--resume", out, "--iterations", "3"),
        "plot": run("plot", out),
    }
    for command, result in refused.items():
        assert result.exit_code == 2, (command, result.output)
        assert "loading it imports" in result.output and "--trust-backbone" in result.output
        assert len(result.output.strip().splitlines()) == 1, (command, result.output)
    with pytest.raises(ConfigError, match="`trust_backbone=True`"):
        fewshot.load(out)
    assert not marker.exists()
    assert fewshot.load(out, trust_backbone=True).encoder.embedding_size == 4
    assert marker.exists()
    evaluated = run("eval", out, "--episodes", "2", "--trust-backbone", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    resumed = run("train", "--resume", out, "--iterations", "3", "--trust-backbone")
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.slow
def test_the_normalisation_a_backbone_expects_is_recorded_and_read_back(tmp_path, images):
    out = tmp_path / "run"
    args = folder_run(images, "--algorithm", "protonet", "--out", out, "--iterations", "2")
    result = run("train", *args, "--pixel-mean", "0.485", "--pixel-std", "0.229")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["pixel_mean"] == [0.485] and config["pixel_std"] == [0.229]
    method = fewshot.load(out)
    assert method.preprocessing.mean == [0.485] and method.preprocessing.std == [0.229]


def test_built_in_backbones_need_no_trust(tmp_path):
    config = TrainConfig(algorithm="protonet", dataset="omniglot", backbone="conv4").resolved()
    (tmp_path / "run").mkdir()
    checkpoint.write_config(tmp_path / "run", config)
    checkpoint.save_weights(build_algorithm(config), tmp_path / "run" / checkpoint.BEST_WEIGHTS)
    assert fewshot.load(tmp_path / "run").encoder is not None


def conv4_body_weights(path: Path) -> dict[str, torch.Tensor]:
    """A Conv4 body's state dict (with running statistics), saved to `path`."""
    torch.manual_seed(5)
    body = Conv4(track_running_stats=True).features
    state = {k: v.clone() for k, v in body.state_dict().items()}
    for tensor in state.values():  # not the initial ones and zeros
        if tensor.is_floating_point():
            tensor.uniform_(0.5, 1.5)
    save_file(state, path)
    return state


@pytest.mark.parametrize("method", ["maml++", "meta-lstm"])
def test_weights_fill_every_inner_step_of_per_step_batch_norm(tmp_path, method):
    """MAML++'s per-step batch norm (and Meta-LSTM's) has a row per inner step: each starts
    from the file's one row, as `PerStepBatchNorm.replacing` starts them from one layer."""
    state = conv4_body_weights(tmp_path / "conv4.safetensors")
    algorithm = build_algorithm(TrainConfig(algorithm=method, dataset="omniglot").resolved())
    start_from_weights(algorithm, tmp_path / "conv4.safetensors")
    loaded = next(backbones_in(algorithm)).state_dict()
    per_step = [k for k in state if k in loaded and loaded[k].dim() == state[k].dim() + 1]
    assert "0.1.running_mean" in per_step  # both methods keep statistics per step
    for name in state:
        if name in per_step:
            assert all(torch.equal(row, state[name]) for row in loaded[name]), name
        elif name in loaded and not name.endswith("batches_tracked"):
            assert torch.equal(loaded[name], state[name]), name


def test_maml_plus_plus_never_adapts_a_frozen_parameter():
    config = TrainConfig(algorithm="maml++", dataset="omniglot", freeze="backbone-but-last")
    learner = build_algorithm(config.resolved())
    frozen = {n for n, p in learner.model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("features.0.") for n in frozen)
    assert not frozen & set(learner.adapted_names)
    assert not any(n.startswith("features.3.") for n in frozen)  # the last block learns


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(pixel_mean=[0.5]), "`pixel_mean` and `pixel_std` go together"),
        (dict(pixel_mean=[0.5, 0.5], pixel_std=[0.2, 0.2]), r"give 1 \(the images' channels\)"),
        (dict(pixel_mean=[0.5], pixel_std=[0.0]), "`pixel_std` must be positive"),
        (dict(cache_features=True), "`cache_features` applies to a backbone frozen whole"),
    ],
)
def test_settings_of_a_pretrained_start_that_cannot_work_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(algorithm="protonet", dataset="folder", channels=1, **values).resolved()
