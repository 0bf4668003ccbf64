"""The standard backbones of the few-shot literature. Any other `nn.Module` works as well."""

from __future__ import annotations

from torch import nn


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
        nn.ReLU(),
        *([nn.MaxPool2d(2)] if pool else []),
    )


class Conv4(nn.Module):
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

    def forward(self, x):
        return self.head(self.features(x))


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


class TabularMLP(nn.Module):
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

    def forward(self, x):
        return self.head(self.features(x))


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
    channels: int = 1,
    image_size: int = 28,
    track_running_stats: bool = False,
    features: int | None = None,
) -> nn.Module:
    """The literature's network for a dataset: the sinusoid MLP, an MLP over `features` for
    tables ("csv"), or Conv4 for images (with a `ways`-way linear head, or none for
    `ways=None`: an embedding network)."""
    if dataset == "sinusoid":
        return SinusoidMLP()
    if dataset == "csv":
        return TabularMLP(features, ways, track_running_stats=track_running_stats)
    return Conv4(channels, ways, image_size=image_size, track_running_stats=track_running_stats)


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a network into its body (feature extractor) and its final layer, for methods that
    adapt only the head: Conv4's (or TabularMLP's) `features` and `head`, or a Sequential's
    last layer."""
    if isinstance(model, (Conv4, TabularMLP)):
        return model.features, model.head
    if isinstance(model, nn.Sequential) and len(model) > 1:
        return nn.Sequential(*list(model)[:-1]), model[-1]
    raise TypeError(f"cannot tell the head of a {type(model).__name__}; pass body and head.")
