"""Options of image-folder runs: per-channel standardisation, and random flips and crops of the
training images (`--normalize`, `--augment flip,crop`).

Augmentation draws from the sampler's generator, so a run stays reproducible and resumes
bitwise; validation and test episodes are never augmented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewshot.errors import ConfigError

AUGMENTATIONS = ("flip", "crop")
CROP_FRACTION = 1 / 8  # random crops shift an image by up to this share of its side


def parse_augment(text: str | None, setting: str = "augment") -> tuple[str, ...]:
    """`"flip,crop"` -> ("flip", "crop"); unknown names are refused with one line that names
    the `setting` they were given as."""
    names = tuple(n.strip() for n in (text or "").split(",") if n.strip())
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(
            f"`{setting}={text}`: unknown {', '.join(unknown)}; choose among "
            f"{', '.join(AUGMENTATIONS)} (comma-separated)."
        )
    return names


def pixel_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (n - 1 in the denominator) of uint8 images
    (n, c, h, w), in [0, 1] units; read `chunk` images at a time, so a memory-mapped dataset
    larger than memory (tieredImageNet) is never converted whole. The sums of pixel values and
    of their squares are integers, exact in float64 up to 2^53."""
    channels, pixels = images.shape[1], images.shape[2] * images.shape[3]
    sums = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].double()
        sums += part.sum((0, 2, 3))
        squares += part.square().sum((0, 2, 3))
    n = len(images) * pixels
    mean = sums / n
    variance = (squares - sums * mean) / max(n - 1, 1)
    std = variance.clamp(min=0).sqrt()
    return (mean / 255).tolist(), [s / 255 if s > 0 else 1.0 for s in std.tolist()]


@dataclass(frozen=True)
class ImageTransform:
    """Applied by a sampler to float images (..., c, h, w): random flips and crops when
    `augment` names them, then standardisation with `mean` and `std` when given."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: tuple[str, ...] = ()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, *shape[-3:])
        if "flip" in self.augment:
            flipped = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        if "crop" in self.augment:
            x = random_crops(x, max(1, round(shape[-1] * CROP_FRACTION)), generator)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype)[:, None, None]
            std = torch.tensor(self.std, dtype=x.dtype)[:, None, None]
            x = (x - mean) / std
        return x.reshape(shape)


def random_crops(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Each image (n, c, h, w) cropped back to its size from its reflection-padded copy at a
    random offset of up to `pad` pixels each way."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]  # (n, 1, h, 1)
    cols = (left[:, None] + torch.arange(w))[:, None, None, :]  # (n, 1, 1, w)
    images = torch.arange(n)[:, None, None, None]
    channel = torch.arange(x.shape[1])[None, :, None, None]
    return padded[images, channel, rows, cols]
