"""Your own few-shot data: a folder with one sub-folder of images per class.

For training from the command line (`--dataset folder --data-root DIR`), DIR holds `train/`,
`val/` and `test/`, each with class folders, so the three parts have disjoint classes:

    DIR/train/<class>/<image>   DIR/val/<class>/<image>   DIR/test/<class>/<image>

Images of any size and mode are converted to `channels` (1: grayscale, 3: RGB; by default 3
if any training image has colour, else 1) and resized to `image_size` x `image_size`. Hidden
files (starting with ".") are skipped; any other file that is not an image, and any class
folder without images, is refused with a message naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fewshot.datasets.images import (
    UNREADABLE,
    channels_of,
    decode_resized,
    image_files,
    open_flat,
)
from fewshot.datasets.registry import IMAGE_SETTINGS, IMAGE_VALUES, Dataset, register
from fewshot.errors import DataError

MODES = {1: "L", 3: "RGB"}


def load_image_folder(
    root: str | os.PathLike, image_size: int = 28, channels: int | None = 1
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images (n, channels, size, size) uint8, their class labels, and the class names.

    `channels=None` takes them from the images: 3 if any image has colour, else 1.
    """
    root = Path(root)
    if channels not in (*MODES, None):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist.")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders; put each class's images in its own folder.")
    files = [image_files(folder) for folder in classes]
    for folder, found in zip(classes, files):
        if not found:
            raise DataError(f"class folder {folder} holds no images; add some or remove it.")
    paths = [path for found in files for path in found]
    if channels is None:
        channels = 3 if any(_channels(path) == 3 for path in paths) else 1
    images = [_read_image(path, image_size, MODES[channels]) for path in paths]
    labels = [label for label, found in enumerate(files) for _ in found]
    array = np.stack(images)
    array = array[:, None] if channels == 1 else array.transpose(0, 3, 1, 2)  # to (n, c, h, w)
    return (
        torch.from_numpy(np.ascontiguousarray(array)),
        torch.tensor(labels),
        [c.name for c in classes],
    )


def _channels(path: Path) -> int:
    try:
        return channels_of(open_flat(path))
    except UNREADABLE as error:
        raise _unreadable(path, error) from None


def _read_image(path: Path, size: int, mode: str) -> np.ndarray:
    try:
        return decode_resized(path, size, mode)
    except UNREADABLE as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> DataError:
    return DataError(
        f"{path} is not an image that can be read ({type(error).__name__}); remove it from the "
        "class folder."
    )


def load_parts(config, data_root: Path | None, download: bool, parts: tuple[str, ...]):
    """(images, labels, None) of each part: DATA_ROOT/train, /val and /test, all converted to
    the run's channels, else to those the first part's images have."""
    if data_root is None:
        raise DataError("`dataset=folder` needs `data_root` DIR with train/, val/, test/.")
    loaded, channels = [], config.channels  # None: the first part's images decide
    for part in parts:
        images, labels, _ = load_image_folder(Path(data_root) / part, config.image_size, channels)
        channels = images.shape[1]
        loaded.append((images, labels, None))
    return loaded


register(
    Dataset(
        "folder",
        task="classification",
        inputs="images",
        network="backbone",
        defaults_from=("omniglot",),
        settings=(*IMAGE_SETTINGS, "image_size", "channels"),
        values={**IMAGE_VALUES, "image_size": 28},
        load=load_parts,
        from_data=("channels",),
        source="an image folder, read as it is",
        measures_background=True,
    )
)
