"""The standard backbones of the few-shot literature. Any other `nn.Module` works as well."""

from __future__ import annotations

from typing import cast

from torch import nn

from fewshot.datasets.registry import get_dataset
from fewshot.errors import ConfigError

BACKBONES = ("conv4", "conv4-32", "resnet12", "resnet12-narrow")  # for images (`default_model`)


def conv_block(
    in_channels: int,
    out_channels: int,
    track_running_stats: bool,
    padding: int = 1,
    pool: bool = True,
) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU, 2x2 max-pool: one stage of Conv4."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=padding),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        # in place: the same values without a new buffer a stage (docs/parity.md, Baseline's time)
        nn.ReLU(inplace=True),
        *([nn.MaxPool2d(2)] if pool else []),
    )


class FeaturesAndHead(nn.Module):
    """A network made of a feature extractor `features` (an `nn.Sequential`) and a final layer
    `head`: forward(x) = head(features(x))."""

    features: nn.Sequential
    head: nn.Module
    embedding_size: int  # the features' size, what `head` takes

    def forward(self, x):
        return self.head(self.features(x))


class Conv4(FeaturesAndHead):
    """Four conv blocks of `hidden` filters and a linear head (Finn et al. 2017; Snell et al. 2017).

    With `out_features=None` it returns the flattened embedding (64 features for 28x28 input), as
    Prototypical Networks use it. MAML normalises with each task's batch statistics, so its
    default `track_running_stats=False` keeps no running statistics at all.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int | None = 5,
        hidden: int = 64,
        image_size: int = 28,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.features = nn.Sequential(
            *(conv_block(a, b, track_running_stats) for a, b in zip(channels, channels[1:])),
            nn.Flatten(),
        )
        spatial = image_size
        for _ in range(4):
            spatial //= 2
        self.embedding_size = hidden * spatial * spatial
        self.head = nn.Linear(self.embedding_size, out_features) if out_features else nn.Identity()


class ResidualBlock(nn.Module):
    """One block of ResNet-12: three 3x3 convolutions (no bias) with batch norm, LeakyReLU(0.1)
    after the first two and after the sum with a 1x1 convolution-batch-norm shortcut, then a
    2x2 max-pool:

        h1 = act(bn1(conv1 x)),  h2 = act(bn2(conv2 h1)),
        y = maxpool(act(bn3(conv3 h2) + bn_s(conv_s x))),  act(z) = max(z, 0.1 z).
    """

    def __init__(self, in_channels: int, out_channels: int, track_running_stats: bool) -> None:
        super().__init__()

        def norm() -> nn.BatchNorm2d:
            return nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats)

        def conv(a: int, b: int, kernel: int) -> nn.Conv2d:
            return nn.Conv2d(a, b, kernel, padding=kernel // 2, bias=False)

        self.conv1, self.bn1 = conv(in_channels, out_channels, 3), norm()
        self.conv2, self.bn2 = conv(out_channels, out_channels, 3), norm()
        self.conv3, self.bn3 = conv(out_channels, out_channels, 3), norm()
        self.shortcut = nn.Sequential(conv(in_channels, out_channels, 1), norm())
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    stages = 3  # for `checkpoint_segments`

    def forward(self, x, stage: int | None = None):
        """y; or, for activation checkpointing, one stage of it: stage 0 maps x to (h1, x),
        stage 1 (h1, x) to (h2, x), stage 2 (h2, x) to y."""
        if stage is None:
            for k in range(self.stages):
                x = self.forward(x, k)
            return x
        if stage == 0:
            return self.act(self.bn1(self.conv1(x))), x
        h, x = x
        if stage == 1:
            return self.act(self.bn2(self.conv2(h))), x
        return self.pool(self.act(self.bn3(self.conv3(h)) + self.shortcut(x)))


CONV4_WIDTHS = {
    "conv4": 64,  # Vinyals et al. 2016; Snell et al. 2017; Finn et al. 2017 on Omniglot
    "conv4-32": 32,  # Finn et al. 2017 and Ravi & Larochelle 2017 on miniImageNet
}
RESNET12_WIDTHS = {
    "resnet12": (64, 160, 320, 640),  # Lee et al. 2019 (MetaOptNet)
    "resnet12-narrow": (64, 128, 256, 512),  # Oreshkin et al. 2018 (TADAM)
}


class ResNet12(FeaturesAndHead):
    """ResNet-12 as the few-shot literature uses it (Oreshkin et al. 2018; Lee et al. 2019):
    four `ResidualBlock`s of `widths` filters (84x84 input: 5x5 maps after the fourth), global
    average pooling and a linear head.

    With `out_features=None` it returns the average-pooled embedding (`widths[-1]` features:
    640), as TADAM, learn2learn's ResNet12 and most later work use it; `average_pool=False`
    flattens the last maps instead (MetaOptNet's 16,000 features at 84x84). Convolutions are
    initialised as MetaOptNet's (Kaiming normal, fan-out, leaky ReLU); DropBlock is left out.
    Batch norm keeps no running statistics by default, as `Conv4`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_features: int | None = 5,
        widths: tuple[int, ...] = RESNET12_WIDTHS["resnet12"],
        image_size: int = 84,
        average_pool: bool = True,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        channels = [in_channels, *widths]
        blocks = [ResidualBlock(a, b, track_running_stats) for a, b in zip(channels, channels[1:])]
        pool = [nn.AdaptiveAvgPool2d(1)] if average_pool else []
        self.features = nn.Sequential(*blocks, *pool, nn.Flatten())
        side = image_size
        for _ in blocks:
            side //= 2
        self.embedding_size = widths[-1] * (1 if average_pool else side * side)
        self.head = nn.Linear(self.embedding_size, out_features) if out_features else nn.Identity()
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")


class RelationEncoder(nn.Sequential):
    """Sung et al. 2018's embedding module: four conv blocks of `hidden` filters, the first two
    unpadded and pooled, the last two padded and not, so it returns feature maps (64 x 5 x 5 for
    28 x 28 input) for the relation module to compare."""

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__(
            conv_block(in_channels, hidden, True, padding=0),
            conv_block(hidden, hidden, True, padding=0),
            conv_block(hidden, hidden, True, pool=False),
            conv_block(hidden, hidden, True, pool=False),
        )
        side = ((image_size - 2) // 2 - 2) // 2
        self.output_shape = (hidden, side, side)


class TabularMLP(FeaturesAndHead):
    """Fully connected blocks (linear, batch norm, ReLU) of `hidden` units and a linear head,
    for feature vectors (tabular rows): Conv4's structure with linear layers.

    With `out_features=None` it returns the last block's output (`embedding_size` features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | None = 5,
        hidden: tuple[int, ...] = (64, 64, 64),
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        self.features = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Linear(a, b),
                    nn.BatchNorm1d(b, track_running_stats=track_running_stats),
                    nn.ReLU(),
                )
                for a, b in zip(sizes, sizes[1:])
            )
        )
        self.embedding_size = sizes[-1]
        self.head = nn.Linear(self.embedding_size, out_features) if out_features else nn.Identity()


class SinusoidMLP(nn.Sequential):
    """The 1-40-40-1 ReLU network of the MAML sinusoid experiment."""

    def __init__(self, hidden: int = 40) -> None:
        super().__init__(
            nn.Linear(1, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )


def default_model(
    dataset: str,
    ways: int | None,
    channels: int | None = 1,
    image_size: int | None = 28,
    track_running_stats: bool = False,
    features: int | None = None,
    backbone: str = "conv4",
) -> nn.Module:
    """The literature's network for a dataset (its registered `network`): the sinusoid MLP, an
    MLP over a table's `features`, or for images the `backbone` (`BACKBONES`: Conv4 of 64 or 32
    filters or a ResNet-12), with a `ways`-way linear head, or none for `ways=None`: an
    embedding network."""
    network = get_dataset(dataset).network
    if network == "sinusoid-mlp":
        return SinusoidMLP()
    if network == "table-mlp":
        assert features is not None  # a table's: given, or read from its data (`from_data`)
        return TabularMLP(features, ways, track_running_stats=track_running_stats)
    if backbone in RESNET12_WIDTHS:
        widths = RESNET12_WIDTHS[backbone]
        assert channels is not None and image_size is not None  # images': given or resolved
        return ResNet12(channels, ways, widths, image_size, track_running_stats=track_running_stats)
    if backbone not in CONV4_WIDTHS:
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}.")
    assert channels is not None and image_size is not None
    return Conv4(
        channels,
        ways,
        hidden=CONV4_WIDTHS[backbone],
        image_size=image_size,
        track_running_stats=track_running_stats,
    )


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a network into its body (feature extractor) and its final layer, for methods that
    adapt only the head: Conv4's (ResNet12's, TabularMLP's) `features` and `head`, or a
    Sequential's last layer."""
    if isinstance(model, FeaturesAndHead):
        return model.features, model.head
    if isinstance(model, nn.Sequential) and len(model) > 1:
        return nn.Sequential(*list(model)[:-1]), model[-1]
    raise TypeError(f"cannot tell the head of a {type(model).__name__}; pass body and head.")


def checkpoint_segments(model: nn.Module) -> list[tuple[str, nn.Module, int | None]]:
    """(name prefix, module, stage) triples whose composition, in order, is `model`'s forward:
    the parts that activation checkpointing recomputes one at a time. A `FeaturesAndHead`
    gives the layers of its `features` (Conv4's conv blocks, ResNet-12's residual blocks) and
    its head (its `features` whole where they are skipped, `training.feature_cache`), an
    `nn.Sequential` its layers, any other model itself; a module with `stages`
    (`ResidualBlock`) is split into `module(x, stage=k)`, k = 0 .. stages - 1 (stage None: the
    whole module)."""
    if type(model).forward is FeaturesAndHead.forward:
        network = cast(FeaturesAndHead, model)  # its forward is head(features(x))
        parts = [(f"features.{n}", m) for n, m in network.features.named_children()]
        if getattr(network.features, "skipped", False):  # given features, it passes them on
            parts = [("features", network.features)]
        parts.append(("head", network.head))
    elif type(model).forward is nn.Sequential.forward:
        parts = list(model.named_children())
    else:
        parts = [("", model)]
    return [
        (name, module, stage)
        for name, module in parts
        for stage in (range(cast(int, module.stages)) if hasattr(module, "stages") else [None])
    ]
