"""miniImageNet and tieredImageNet, read in their published layouts.

miniImageNet (Vinyals et al. 2016), with Ravi & Larochelle's (2017) split: `DIR/train.csv`,
`DIR/val.csv` and `DIR/test.csv`, each a header `filename,label` and one row per image
(`n0153282900000005.jpg,n01532829`), and the JPEGs themselves in `DIR/images/`. 64, 16 and 20
classes of 600 images each.

tieredImageNet (Ren et al. 2018): `DIR/train/`, `DIR/val/` and `DIR/test/`, each holding one
folder of images per class (named by its ImageNet synset), the layout the common conversion
tools write from ImageNet with Ren et al.'s class lists: 351, 97 and 160 classes, 779,165
images. Ren et al.'s own release is Python pickles, which are not read (unpickling a file can run
code of its author's choosing); convert them to class folders first.

Both are decoded once to `image_size` x `image_size` RGB (Lanczos) into a memory-mapped cache
(`image_cache`), so that training holds no copy of them in memory.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from fewshot.datasets.image_cache import decoded_classes
from fewshot.datasets.images import image_files
from fewshot.errors import DataError

PARTS = ("train", "val", "test")
MINI_HEADER = ["filename", "label"]


def load_mini_imagenet(
    root: str | Path, part: str, image_size: int = 84
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, size, size) uint8, memory-mapped, and labels of one part of Ravi &
    Larochelle's split; classes sorted by synset, images in the order of the CSV file."""
    root = Path(root)
    by_part = {p: mini_imagenet_rows(root, p) for p in PARTS}
    _check_disjoint({p: set(rows) for p, rows in by_part.items()}, "classes of the CSV files")
    images = root / "images"
    if not images.is_dir():
        raise DataError(
            f"miniImageNet's images/ folder is not in {root}; put the JPEGs named in the CSV "
            "files there."
        )
    rows = by_part[part]
    classes = [[images / name for name in rows[label]] for label in sorted(rows)]
    missing = [path for found in classes for path in found if not path.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]} is listed in {root / (part + '.csv')} but missing ({len(missing)} of "
            f"the part's images are); copy the complete images/ folder."
        )
    return decoded_classes(f"mini-imagenet-{part}", root, classes, image_size)


def mini_imagenet_rows(root: Path, part: str) -> dict[str, list[str]]:
    """The image file names of each class (synset) of one part's CSV file, in file order."""
    path = root / f"{part}.csv"
    if not path.is_file():
        raise DataError(
            f"miniImageNet's {part}.csv is not in {root}; point `data_root` at the folder that "
            "holds train.csv, val.csv and test.csv (Ravi & Larochelle's split) and images/."
        )
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path} is not a CSV file ({error}).") from None
    if not lines or [cell.strip() for cell in lines[0]] != MINI_HEADER:
        raise DataError(
            f"{path} does not start with the header 'filename,label' of Ravi & Larochelle's "
            "split files; is it one of them?"
        )
    rows: dict[str, list[str]] = {}
    for number, cells in enumerate(lines[1:], start=2):
        if not cells:
            continue
        if len(cells) != 2 or not all(c.strip() for c in cells):
            raise DataError(f"{path}, line {number}: expected 'filename,label', got {cells}.")
        name, label = (c.strip() for c in cells)
        if Path(name).name != name or name in (".", ".."):
            raise DataError(f"{path}, line {number}: {name!r} is not a file name in images/.")
        rows.setdefault(label, []).append(name)
    if not rows:
        raise DataError(f"{path} lists no images.")
    return rows


def load_tiered_imagenet(
    root: str | Path, part: str, image_size: int = 84
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, size, size) uint8, memory-mapped, and labels of one part: the class
    folders of `root/part`, sorted by name, their images sorted by name."""
    root = Path(root)
    if any(root.glob("*_images_png.pkl")) and not (root / part).is_dir():
        raise DataError(
            f"{root} holds Ren et al.'s pickled tieredImageNet, which fewshot does not unpickle "
            "(a pickle can run code); convert it to train/, val/, test/ class folders of images."
        )
    folders = {p: _class_folders(root, p) for p in PARTS}
    _check_disjoint({p: {f.name for f in found} for p, found in folders.items()}, "class folders")
    classes = []
    for folder in folders[part]:
        found = image_files(folder)
        if not found:
            raise DataError(f"class folder {folder} holds no images; add them or remove it.")
        classes.append(found)
    return decoded_classes(f"tiered-imagenet-{part}", root, classes, image_size)


def _class_folders(root: Path, part: str) -> list[Path]:
    folder = root / part
    if not folder.is_dir():
        raise DataError(
            f"tieredImageNet's {part}/ folder is not in {root}; point `data_root` at the folder "
            "that holds train/, val/ and test/, each with one folder of images per class."
        )
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"{folder} has no class folders; put each class's images in its own.")
    return found


def _check_disjoint(classes: dict[str, set[str]], what: str) -> None:
    """Refuse a class that is in two parts: its test episodes would not be held out."""
    for i, first in enumerate(PARTS):
        for second in PARTS[i + 1 :]:
            shared = sorted(classes[first] & classes[second])
            if shared:
                raise DataError(
                    f"{shared[0]} is in both the {first} and the {second} part ({len(shared)} "
                    f"{what} are); the parts must have disjoint classes."
                )
