"""CUB-200-2011 (Wah et al. 2011) with the split of Chen et al. (2019), "A Closer Look at
Few-shot Classification" (their `filelists/CUB/write_CUB_filelist.py`).

Read from `DIR/CUB_200_2011/images/<class>/*.jpg` (or `DIR/images/...` when DIR is the
CUB_200_2011 folder itself), the class folders named `001.Black_footed_Albatross` to
`200.Common_Yellowthroat`. Chen et al. sort the 200 class folders by name and take class i
(counting from 0) for training when i % 2 == 0 (100 classes), for validation when i % 4 == 1
(50) and for testing when i % 4 == 3 (50). Sorted by name, folder `NNN.` is class NNN - 1,
so the rule is applied to the folders' numbers. All images of a class are used (11,788 in all).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fewshot.datasets.image_cache import decoded_classes
from fewshot.datasets.images import image_files
from fewshot.errors import DataError

CLASSES = 200
FOLDER_NAME = re.compile(r"(\d{3})\.\S+")


def chen_part(index: int) -> str | None:
    """The part of Chen et al.'s split that class `index` (0..199) belongs to."""
    if index % 2 == 0:
        return "train"
    return "val" if index % 4 == 1 else "test"


def load_cub(
    root: str | Path, part: str, image_size: int = 84
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, size, size) uint8, memory-mapped, and labels of one part of Chen et al.'s
    split; classes in folder order, images sorted by name."""
    images = cub_images_folder(Path(root))
    classes = []
    for folder in sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if chen_part(class_index(folder)) != part:
            continue
        found = image_files(folder)
        if not found:
            raise DataError(f"class folder {folder} holds no images; copy it again.")
        classes.append(found)
    return decoded_classes(f"cub-{part}", images, classes, image_size)


def cub_images_folder(root: Path) -> Path:
    """`root/CUB_200_2011/images`, or `root/images` when root is the CUB_200_2011 folder."""
    for images in (root / "CUB_200_2011" / "images", root / "images"):
        if images.is_dir():
            return images
    raise DataError(
        f"CUB_200_2011/images is not in {root}; point `data_root` at the folder where "
        "CUB_200_2011.tgz was unpacked (it holds CUB_200_2011/images/<class>/*.jpg)."
    )


def class_index(folder: Path) -> int:
    """0..199 from a class folder named `NNN.Name` (Chen et al.'s index in sorted order)."""
    match = FOLDER_NAME.fullmatch(folder.name)
    if match is None or not 1 <= int(match.group(1)) <= CLASSES:
        raise DataError(
            f"{folder} is not a CUB-200-2011 class folder (named 001.Name to 200.Name); "
            "remove it from images/."
        )
    return int(match.group(1)) - 1
