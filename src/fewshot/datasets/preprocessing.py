"""What a trained model's images went through, and the same for a user's own images.

A run records the preprocessing of its training images (`preprocessing.json`): their size,
their channels and the brightness of their background. Omniglot's black-on-white drawings are
inverted when they are read, so the model saw bright strokes on a dark background; a user's
black-on-white drawing must be inverted the same way, while an image that already sits on a
dark background (white chalk on a blackboard, a product photo on black) must not. `invert="auto"`
decides it per image from the brightness of its border, so the decision for one image never
depends on the others read with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fewshot.datasets.images import UNREADABLE, channels_of, image_files, open_flat, resized
from fewshot.datasets.transforms import ImageTransform
from fewshot.errors import ConfigError, DataError
from fewshot.files import atomic_write_text
from fewshot.tasks import Support, as_float

PREPROCESSING_FILE = "preprocessing.json"
INVERT_CHOICES = ("auto", "always", "never")
# A training set's background is "dark" or "light" when at least this share of its images'
# borders are; otherwise (natural photos) it has none, and no image is ever inverted for it.
CONSISTENT_BACKGROUND = 0.95
BORDER_FRACTION = 1 / 16  # of the image's side: the ring whose brightness names the background


@dataclass(frozen=True)
class Preprocessing:
    """How images reached a model: converted to `channels` (1 grayscale, 3 RGB), resized to
    `image_size` x `image_size` with Lanczos filtering, scaled to [0, 1] (and standardised with
    `mean` and `std` per channel, where the run asked for it); `background` is the training
    images' background ("dark", "light", or None for no consistent one)."""

    image_size: int
    channels: int
    background: str | None
    source: str = ""
    mean: list[float] | None = None  # per-channel standardisation (--normalize), in [0, 1] units
    std: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def read(
        self, path: str | os.PathLike, invert: str = "auto", convert: bool = False
    ) -> tuple[torch.Tensor, bool]:
        """One image file as the model's training data was: (channels, size, size) uint8, and
        whether it was inverted. Refuses (DataError) an unreadable file, and one whose colour
        differs from the model's (colour for a grayscale model, or the reverse) unless
        `convert`."""
        if invert not in INVERT_CHOICES:
            raise ConfigError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}.")
        path = Path(path)
        try:
            flat = open_flat(path)
        except UNREADABLE as error:
            raise DataError(
                f"{path} is not an image that can be read ({type(error).__name__}); remove it or "
                "replace it with a PNG or JPEG."
            ) from None
        found = channels_of(flat)
        if found != self.channels and not convert:
            kinds = {1: "grayscale", 3: "colour"}
            raise DataError(
                f"{path} is a {kinds[found]} image but the model was trained on "
                f"{kinds[self.channels]} ones ({self.channels} channel"
                f"{'s' if self.channels > 1 else ''}); pass `convert=True` to convert it."
            )
        pixels = resized(flat, self.image_size, "L" if self.channels == 1 else "RGB")
        inverted = self.should_invert(np.asarray(flat.convert("L")), invert)
        if inverted:
            pixels = 255 - pixels
        pixels = pixels[None] if self.channels == 1 else pixels.transpose(2, 0, 1)
        return torch.from_numpy(pixels.copy()), inverted  # a writable, contiguous copy

    def read_images(
        self, paths: list[Path], invert: str = "auto", convert: bool = False
    ) -> tuple[torch.Tensor, list[bool]]:
        """Image files as one float batch (n, channels, size, size) in [0, 1], and which of
        them were inverted."""
        read = [self.read(path, invert, convert) for path in paths]
        images = as_float(torch.stack([x for x, _ in read]))
        if self.mean is not None:
            assert self.std is not None  # recorded with the mean (--normalize)
            images = ImageTransform(tuple(self.mean), tuple(self.std))(images)
        return images, [inverted for _, inverted in read]

    def read_support(
        self, folder: str | os.PathLike, invert: str = "auto", convert: bool = False
    ) -> tuple[Support, list[bool]]:
        """A support set from a folder with one subfolder of images per class (class names are
        the subfolders' names, in sorted order), and which images were inverted."""
        folder = Path(folder)
        classes = _class_folders(folder)
        files = [image_files(c) for c in classes]  # as image folders for training are read
        for c, found in zip(classes, files):
            if not found:
                raise DataError(f"class folder {c} holds no images; each class needs at least one.")
        x, inverted = self.read_images([f for found in files for f in found], invert, convert)
        y = torch.cat([torch.full((len(f),), i) for i, f in enumerate(files)])
        return Support(x, y, [c.name for c in classes]), inverted

    def should_invert(self, gray: np.ndarray, invert: str = "auto") -> bool:
        """Whether an image (its grayscale pixels) must be inverted to sit on the training
        images' background: always, never, or ("auto") when its border's brightness is on the
        other side of the middle from that background."""
        if invert != "auto":
            return invert == "always"
        if self.background is None:
            return False
        return background_of_image(gray) != self.background


def background_of_image(gray: np.ndarray) -> str:
    """ "dark" or "light": the mean brightness of the image's border ring against the middle."""
    return "dark" if border_brightness(torch.from_numpy(gray.copy())) < 128 else "light"


def border_brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean value of the border ring (`BORDER_FRACTION` of the side) of images (..., h, w),
    selected before the conversion to float so that a large uint8 dataset is not copied."""
    h, w = images.shape[-2:]
    width = max(1, round(min(h, w) * BORDER_FRACTION))
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[width:-width, width:-width] = False
    return images[..., ring].float().mean(-1)


def background_of(images: torch.Tensor) -> str | None:
    """The background of a set of uint8 images (n, channels, h, w): "dark" or "light" where
    nearly all of them agree (`CONSISTENT_BACKGROUND`), else None."""
    dark = (border_brightness(images).mean(1) < 128).float().mean().item()
    if dark >= CONSISTENT_BACKGROUND:
        return "dark"
    if 1 - dark >= CONSISTENT_BACKGROUND:
        return "light"
    return None


def write_preprocessing(run_dir: Path, preprocessing: Preprocessing) -> None:
    text = json.dumps(preprocessing.to_dict(), indent=2) + "\n"
    path = Path(run_dir) / PREPROCESSING_FILE
    atomic_write_text(path, text)


def read_preprocessing(run_dir: Path) -> Preprocessing | None:
    """The run's recorded preprocessing, or None when it has no record."""
    path = Path(run_dir) / PREPROCESSING_FILE
    if not path.is_file():
        return None
    try:
        return Preprocessing(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        raise DataError(f"{path} is not a valid preprocessing record ({error}).") from None


def _class_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"support folder {folder} does not exist.")
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    loose = [p.name for p in entries if not p.is_dir()]
    if loose:
        raise DataError(
            f"{folder} holds files outside class folders ({', '.join(loose[:3])}); put each "
            "image in the folder of its class: SUPPORT/<class>/<image>."
        )
    if len(entries) < 2:
        raise DataError(
            f"{folder} has {len(entries)} class folder{'s' if len(entries) != 1 else ''}; a "
            "support set needs at least 2 classes, each in its own folder."
        )
    return entries
