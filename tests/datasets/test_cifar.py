"""CIFAR-FS and FC100 from CIFAR-100's binary files: the published splits, pixels read back as
written, and one-line errors for a missing, truncated or foreign file."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fewshot.cli import main
from fewshot.datasets.cifar import (
    CIFAR_FS,
    FC100,
    FC100_SUPERCLASSES,
    FINE_NAMES,
    SUPERCLASSES,
    load_cifar_fewshot,
)
from fewshot.errors import DataError

# CIFAR-100's label order, as its archive's label-name files list them (fine: alphabetical).
COARSE = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
]  # fmt: skip
# A few classes of each published part, checked by hand against the split files.
CIFAR_FS_SAMPLES = {
    "train": {"dolphin", "seal", "lion", "train", "willow_tree"},
    "val": {"beaver", "otter", "crocodile", "tractor", "sea"},
    "test": {"whale", "poppy", "sweet_pepper", "woman", "rocket"},
}
FC100_COARSE_IDS = {  # Oreshkin et al.'s superclass indices
    "train": {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19},
    "val": {8, 11, 13, 16},
    "test": {0, 7, 12, 14},
}


def test_class_lists_partition_cifar100_as_published():
    assert list(SUPERCLASSES) == COARSE
    assert len(FINE_NAMES) == 100 and list(FINE_NAMES) == sorted(FINE_NAMES)
    for split, sizes in ((CIFAR_FS, (64, 16, 20)), (FC100, (60, 20, 20))):
        parts = [set(split[p]) for p in ("train", "val", "test")]
        assert tuple(len(p) for p in parts) == sizes
        assert set.union(*parts) == set(FINE_NAMES) and sum(map(len, parts)) == 100
    for part, names in CIFAR_FS_SAMPLES.items():
        assert names <= set(CIFAR_FS[part])
    for part, ids in FC100_COARSE_IDS.items():
        assert {COARSE.index(c) for c in FC100_SUPERCLASSES[part]} == ids


def record(fine: str, seed: int) -> bytes:
    """One binary record of class `fine` with seeded random pixels."""
    coarse = next(i for i, c in enumerate(COARSE) if fine in SUPERCLASSES[c])
    pixels = np.random.default_rng(seed).integers(0, 256, 3072, dtype=np.uint8)
    return bytes([coarse, FINE_NAMES.index(fine)]) + pixels.tobytes()


# classes of every part of both splits: CIFAR-FS train/val/test, and FC100's
FIXTURE_CLASSES = [
    "dolphin",
    "beaver",
    "whale",
    "aquarium_fish",
    "bear",
    "baby",
    "flatfish",
    "lion",
]


def write_cifar(root, per_file=(3, 2)):
    """cifar-100-binary/train.bin and test.bin with `per_file` images of each fixture class,
    interleaved by class as in the real files; returns {(class, file, i): record bytes}."""
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    written = {}
    for f, (name, count) in enumerate(zip(("train.bin", "test.bin"), per_file)):
        records = []
        for i in range(count):
            for c, fine in enumerate(FIXTURE_CLASSES):
                written[fine, name, i] = record(fine, seed=1000 * f + 10 * i + c)
                records.append(written[fine, name, i])
        (folder / name).write_bytes(b"".join(records))
    return written


@pytest.mark.parametrize(
    "split, part, classes",
    [
        ("cifar-fs", "train", ["aquarium_fish", "bear", "dolphin", "lion"]),
        ("cifar-fs", "val", ["beaver", "flatfish"]),
        ("cifar-fs", "test", ["baby", "whale"]),
        ("fc100", "train", ["aquarium_fish", "flatfish"]),
        ("fc100", "val", ["bear", "lion"]),
        ("fc100", "test", ["baby", "beaver", "dolphin", "whale"]),
    ],
)
def test_parts_hold_their_classes_pixels_as_written(tmp_path, split, part, classes):
    written = write_cifar(tmp_path)
    images, labels = load_cifar_fewshot(tmp_path, split, part)
    assert images.dtype == torch.uint8 and images.shape == (5 * len(classes), 3, 32, 32)
    expected = [
        (fine, name, i)
        for fine in sorted(classes)
        for name, count in (("train.bin", 3), ("test.bin", 2))
        for i in range(count)
    ]
    assert labels.tolist() == [FINE_NAMES.index(fine) for fine, _, _ in expected]
    for image, key in zip(images, expected):
        pixels = np.frombuffer(written[key][2:], dtype=np.uint8)
        # channels first: red plane, green plane, blue plane, each row by row
        assert image[1, 4, 7] == pixels[1024 + 4 * 32 + 7]
        assert np.array_equal(image.numpy().reshape(-1), pixels)


def test_data_root_may_be_the_binary_folder_itself_and_images_resize(tmp_path):
    write_cifar(tmp_path)
    images, _ = load_cifar_fewshot(tmp_path / "cifar-100-binary", "cifar-fs", "val", 16)
    assert images.shape == (10, 3, 16, 16)


def test_truncated_file_is_one_line(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-100-binary" / "test.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="test.bin holds .* not a whole number of 3074-byte"):
        load_cifar_fewshot(tmp_path, "fc100", "train")


def test_missing_file_and_python_version_are_one_line(tmp_path):
    with pytest.raises(DataError, match="cifar-100-binary/train.bin and test.bin.* are not in"):
        load_cifar_fewshot(tmp_path, "cifar-fs", "train")
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(DataError, match="python version, whose pickles fewshot does not read"):
        load_cifar_fewshot(tmp_path, "cifar-fs", "train")


def test_records_of_another_layout_are_refused(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-100-binary" / "train.bin"
    data = bytearray(path.read_bytes())
    data[3074] = 7  # the second record's coarse label, not its fine class's superclass
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="record 1: coarse label 7 .* not a CIFAR-100 class"):
        load_cifar_fewshot(tmp_path, "cifar-fs", "train")


@pytest.mark.slow
def test_train_and_eval_on_fc100_from_the_command_line(tmp_path):
    write_cifar(tmp_path / "data")
    episodes = ["--ways", "2", "--train-ways", "2", "--shots", "1", "--queries", "2"]
    args = ["--algorithm", "protonet", "--dataset", "fc100", "--data-root", tmp_path / "data"]
    quick = ["--iterations", "2", "--val-every", "2", "--val-episodes", "2", "--test-episodes", "4"]
    argv = ["train", *args, *episodes, "--train-queries", "2", *quick, "--out", tmp_path / "run"]
    result = CliRunner().invoke(main, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == "fc100"
    recorded = json.loads((tmp_path / "run" / "preprocessing.json").read_text())
    assert (recorded["image_size"], recorded["channels"], recorded["background"]) == (32, 3, None)
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--episodes", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["episodes"] == 4
