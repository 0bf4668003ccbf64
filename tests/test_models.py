"""The backbones: ResNet-12 against a hand-written forward pass and its well-known size, and the
checkpoint segments of every backbone against the backbone's own forward pass."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.registry import Problem
from fewshot.errors import ConfigError
from fewshot.models import (
    RESNET12_WIDTHS,
    Conv4,
    ResNet12,
    SinusoidMLP,
    TabularMLP,
    body_and_head,
    checkpoint_segments,
    default_model,
)


def resnet12_parameter_count(widths: tuple[int, ...], in_channels: int = 3) -> int:
    """Per block of c_in -> c filters: three 3x3 convolutions without bias (9 c_in c + 2 * 9 c^2),
    a 1x1 shortcut (c_in c) and four batch norms (2 c each)."""
    total, previous = 0, in_channels
    for c in widths:
        total += 9 * previous * c + 2 * 9 * c * c + previous * c + 4 * 2 * c
        previous = c
    return total


def test_resnet12_has_the_fields_parameter_count():
    # Lee et al. 2019's 64-160-320-640 ResNet-12: about 12.4 million parameters.
    wide = ResNet12(3, None)
    count = sum(p.numel() for p in wide.parameters())
    assert count == resnet12_parameter_count((64, 160, 320, 640)) == 12_424_320
    narrow = ResNet12(3, None, RESNET12_WIDTHS["resnet12-narrow"])
    assert sum(p.numel() for p in narrow.parameters()) == 7_996_800
    with_head = ResNet12(3, 5)
    assert sum(p.numel() for p in with_head.parameters()) == count + 640 * 5 + 5


def reference_resnet12(model: ResNet12, x: torch.Tensor) -> torch.Tensor:
    """ResNet-12 written out with torch.nn.functional from the model's weights: per block
    h1 = lrelu(bn(conv(x))), h2 = lrelu(bn(conv(h1))), y = maxpool(lrelu(bn(conv(h2)) +
    bn(conv1x1(x)))); then the global average and the head."""
    w = dict(model.named_parameters())

    def bn(h, name):
        return F.batch_norm(h, None, None, w[f"{name}.weight"], w[f"{name}.bias"], training=True)

    for block in range(4):
        p = f"features.{block}"
        h1 = F.leaky_relu(bn(F.conv2d(x, w[f"{p}.conv1.weight"], padding=1), f"{p}.bn1"), 0.1)
        h2 = F.leaky_relu(bn(F.conv2d(h1, w[f"{p}.conv2.weight"], padding=1), f"{p}.bn2"), 0.1)
        h3 = bn(F.conv2d(h2, w[f"{p}.conv3.weight"], padding=1), f"{p}.bn3")
        shortcut = bn(F.conv2d(x, w[f"{p}.shortcut.0.weight"]), f"{p}.shortcut.1")
        x = F.max_pool2d(F.leaky_relu(h3 + shortcut, 0.1), 2)
    return F.linear(x.mean(dim=(2, 3)), w["head.weight"], w["head.bias"])


def test_resnet12_computes_the_written_out_network():
    torch.manual_seed(0)
    model = ResNet12(3, 5, (4, 6, 8, 10), image_size=32).double()
    x = torch.randn(7, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference_resnet12(model, x))


def test_resnet12_embeddings_average_or_flatten_the_last_maps():
    x = torch.randn(2, 3, 84, 84)
    assert ResNet12(3, None)(x).shape == (2, 640)
    flattened = ResNet12(3, None, average_pool=False)  # MetaOptNet's 16,000 features
    assert flattened.embedding_size == 16_000 and flattened(x).shape == (2, 16_000)


@pytest.mark.parametrize(
    "model, shape",
    [
        (Conv4(1, 3, hidden=4, image_size=16), (5, 1, 16, 16)),
        (ResNet12(3, 3, (4, 5, 6, 7), image_size=16), (5, 3, 16, 16)),
        (TabularMLP(6, 3), (5, 6)),
        (SinusoidMLP(), (5, 1)),
        (nn.Sequential(nn.Flatten(), nn.Linear(48, 3)), (5, 3, 4, 4)),
    ],
    ids=["conv4", "resnet12", "tabular", "sinusoid", "sequential"],
)
def test_checkpoint_segments_compose_to_the_forward_pass(model, shape):
    model = model.double()
    x = torch.randn(*shape, dtype=torch.float64)
    h = x
    for _, module, stage in checkpoint_segments(model):
        h = module(h) if stage is None else module(h, stage=stage)
    torch.testing.assert_close(h, model(x), rtol=0, atol=0)


def test_resnet12_is_split_into_three_stages_per_block():
    names = [(name, stage) for name, _, stage in checkpoint_segments(ResNet12(3, 5))]
    blocks = [(f"features.{b}", s) for b in range(4) for s in range(3)]
    assert names == [*blocks, ("features.4", None), ("features.5", None), ("head", None)]


def test_the_backbone_is_chosen_by_name():
    assert isinstance(default_model("omniglot", 5), Conv4)
    wide = default_model("folder", 5, 3, 84, backbone="resnet12")
    assert isinstance(wide, ResNet12) and wide.embedding_size == 640
    narrow = Problem("folder", 5, 3, 84, backbone="resnet12-narrow").network(head=False)
    assert narrow.embedding_size == 512 and narrow(torch.randn(2, 3, 84, 84)).shape == (2, 512)
    body, head = body_and_head(wide)
    assert body is wide.features and head is wide.head
    with pytest.raises(ConfigError, match="unknown backbone 'resnet18'"):
        default_model("folder", 5, 3, 84, backbone="resnet18")
