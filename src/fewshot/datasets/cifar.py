"""CIFAR-FS and FC100, both built from CIFAR-100's binary version (never from its pickles).

`DIR/cifar-100-binary/train.bin` and `test.bin` (from cifar-100-binary.tar.gz, or DIR being that
folder): each record is 1 coarse-label byte, 1 fine-label byte and 3072 pixel bytes, the 32x32
red plane, then green, then blue (channels first). Both benchmarks use all 600 images of each
class, the 500 of train.bin then the 100 of test.bin.

- CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20 fine classes, as listed in the split files of
  their repository (bertinetto/r2d2, data/cifar-fs/splits/bertinetto).
- FC100 (Oreshkin et al. 2018, TADAM): split by superclass so that the parts share as little as
  possible: 12 / 4 / 4 superclasses, 60 / 20 / 20 fine classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewshot.datasets.images import resized
from fewshot.errors import DataError

RECORD = 2 + 3 * 32 * 32
FILES = ("train.bin", "test.bin")

# CIFAR-100's superclasses (coarse labels 0..19, in this order) and their fine classes; the fine
# labels 0..99 are the fine names in alphabetical order (the archive's fine_label_names.txt).
SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
COARSE_NAMES = tuple(SUPERCLASSES)
FINE_NAMES = tuple(sorted(fine for group in SUPERCLASSES.values() for fine in group))
COARSE_OF_FINE = {fine: coarse for coarse, group in SUPERCLASSES.items() for fine in group}

CIFAR_FS = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus",
        "can", "castle", "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup",
        "dinosaur", "dolphin", "elephant", "forest", "girl", "hamster", "house", "kangaroo",
        "keyboard", "lawn_mower", "lion", "lizard", "lobster", "mountain", "mouse", "mushroom",
        "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate", "porcupine",
        "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper",
        "snake", "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train",
        "trout", "tulip", "turtle", "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
        "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain",
        "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe",
        "whale", "woman", "worm",
    ),
}  # fmt: skip

FC100_SUPERCLASSES = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture", "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2",
    ),
    "val": (
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}  # fmt: skip
FC100 = {
    part: tuple(sorted(fine for coarse in groups for fine in SUPERCLASSES[coarse]))
    for part, groups in FC100_SUPERCLASSES.items()
}
SPLITS = {"cifar-fs": CIFAR_FS, "fc100": FC100}


def load_cifar_fs(root: str | Path, part: str, image_size: int = 32):
    """One part of CIFAR-FS (`load_cifar_fewshot`)."""
    return load_cifar_fewshot(root, "cifar-fs", part, image_size)


def load_fc100(root: str | Path, part: str, image_size: int = 32):
    """One part of FC100 (`load_cifar_fewshot`)."""
    return load_cifar_fewshot(root, "fc100", part, image_size)


def load_cifar_fewshot(
    root: str | Path, split: str, part: str, image_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, size, size) uint8 and fine labels (0..99) of one part of CIFAR-FS
    (`split="cifar-fs"`) or FC100 (`"fc100"`), sorted by class, train.bin's images first."""
    folder = cifar_binary_folder(Path(root))
    wanted = np.array([FINE_NAMES.index(name) for name in SPLITS[split][part]])
    kept = []
    for name in FILES:
        records = read_records(folder / name)
        kept.append(records[np.isin(records[:, 1], wanted)])
    records = np.concatenate(kept)
    records = records[np.argsort(records[:, 1], kind="stable")]
    images = records[:, 2:].reshape(-1, 3, 32, 32)
    if image_size != 32:
        images = np.stack([_resize(image, image_size) for image in images])
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(
        records[:, 1].astype(np.int64)
    )


def cifar_binary_folder(root: Path) -> Path:
    """`root/cifar-100-binary`, or `root` itself when it holds the .bin files."""
    for folder in (root / "cifar-100-binary", root):
        if all((folder / name).is_file() for name in FILES):
            return folder
    if (root / "cifar-100-python").is_dir() or (root / "train").is_file():
        raise DataError(
            f"{root} holds CIFAR-100's python version, whose pickles fewshot does not read (a "
            "pickle can run code); download the binary version, cifar-100-binary.tar.gz."
        )
    raise DataError(
        f"CIFAR-100's binary files (cifar-100-binary/train.bin and test.bin) are not in {root}; "
        "unpack cifar-100-binary.tar.gz there, or point `data_root` at the folder holding it."
    )


def read_records(path: Path) -> np.ndarray:
    """The records (n, 3074) uint8 of a CIFAR-100 .bin file, their labels checked."""
    data = np.fromfile(path, dtype=np.uint8)
    if len(data) == 0 or len(data) % RECORD:
        raise DataError(
            f"{path} holds {len(data):,} bytes, not a whole number of {RECORD}-byte CIFAR-100 "
            "records: it is truncated or not CIFAR-100's binary version. Unpack "
            "cifar-100-binary.tar.gz again."
        )
    records = data.reshape(-1, RECORD)
    coarse, fine = records[:, 0].astype(np.int64), records[:, 1].astype(np.int64)
    expected = np.array([COARSE_NAMES.index(COARSE_OF_FINE[name]) for name in FINE_NAMES])
    bad = np.flatnonzero((fine >= len(FINE_NAMES)) | (coarse != expected[np.minimum(fine, 99)]))
    if len(bad):
        raise DataError(
            f"{path}, record {bad[0]}: coarse label {coarse[bad[0]]} and fine label "
            f"{fine[bad[0]]} are not a CIFAR-100 class; is it CIFAR-100's binary version?"
        )
    return records


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """One (3, 32, 32) image resized to (3, size, size) (`images.resized`, Lanczos)."""
    return resized(Image.fromarray(image.transpose(1, 2, 0)), size, "RGB").transpose(2, 0, 1)
