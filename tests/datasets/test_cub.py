"""CUB-200-2011 with Chen et al.'s split, from a fixture of real class folder names."""

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.datasets.cub import chen_part, load_cub
from fewshot.errors import DataError

# The first eight of CUB-200-2011's 200 class folders.
FOLDERS = [
    "001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
    "004.Groove_billed_Ani", "005.Crested_Auklet", "006.Least_Auklet", "007.Parakeet_Auklet",
    "008.Rhinoceros_Auklet",
]  # fmt: skip
# write_CUB_filelist.py: base when i % 2 == 0, val when i % 4 == 1, novel when i % 4 == 3
EXPECTED = {
    "train": ["001.Black_footed_Albatross", "003.Sooty_Albatross", "005.Crested_Auklet",
              "007.Parakeet_Auklet"],
    "val": ["002.Laysan_Albatross", "006.Least_Auklet"],
    "test": ["004.Groove_billed_Ani", "008.Rhinoceros_Auklet"],
}  # fmt: skip
SIZE = 16


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "cache"))


def write_cub(root, per_class=2):
    """Per image a JPEG whose red value names its class folder and green its index."""
    for c, folder in enumerate(FOLDERS):
        for i in range(per_class):
            pixels = np.full((SIZE, SIZE, 3), (20 * (c + 1), 100 + 50 * i, 60), dtype=np.uint8)
            path = root / "CUB_200_2011" / "images" / folder / f"{folder[4:]}_{i:04d}_{c}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, quality=95, subsampling=0)


def test_rule_gives_100_50_50_classes():
    parts = [chen_part(i) for i in range(200)]
    assert [parts.count(p) for p in ("train", "val", "test")] == [100, 50, 50]
    assert (parts[0], parts[1], parts[3], parts[199]) == ("train", "val", "test", "test")


@pytest.mark.parametrize("part", ["train", "val", "test"])
def test_parts_hold_chen_et_al_classes(tmp_path, part):
    write_cub(tmp_path)
    images, labels = load_cub(tmp_path, part, image_size=SIZE)
    assert images.shape == (2 * len(EXPECTED[part]), 3, SIZE, SIZE)
    assert labels.tolist() == [c for c in range(len(EXPECTED[part])) for _ in range(2)]
    reds = images[:, 0, SIZE // 2, SIZE // 2].tolist()
    greens = images[:, 1, SIZE // 2, SIZE // 2].tolist()
    expected_reds = [20 * (FOLDERS.index(f) + 1) for f in EXPECTED[part] for _ in range(2)]
    assert all(abs(r - e) <= 3 for r, e in zip(reds, expected_reds))
    assert all(abs(g - e) <= 3 for g, e in zip(greens, [100, 150] * len(EXPECTED[part])))


def test_data_root_may_be_the_cub_folder_itself(tmp_path):
    write_cub(tmp_path, per_class=1)
    images, _ = load_cub(tmp_path / "CUB_200_2011", "val")
    assert images.shape == (2, 3, 84, 84) and images.dtype == torch.uint8


def test_bad_layouts_are_one_line(tmp_path):
    with pytest.raises(DataError, match="CUB_200_2011/images is not in"):
        load_cub(tmp_path, "train")
    write_cub(tmp_path, per_class=1)
    (tmp_path / "CUB_200_2011" / "images" / "birds").mkdir()
    with pytest.raises(DataError, match="birds is not a CUB-200-2011 class folder"):
        load_cub(tmp_path, "train")
    only_one = tmp_path / "one" / "CUB_200_2011" / "images" / FOLDERS[0]
    (tmp_path / "CUB_200_2011" / "images" / FOLDERS[0]).rename(
        only_one.parent.mkdir(parents=True) or only_one
    )
    with pytest.raises(DataError, match="holds no images of cub-val's classes"):
        load_cub(tmp_path / "one", "val")
