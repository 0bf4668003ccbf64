import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """Folder with Omniglot's official zips: $FEWSHOT_DATA_ROOT, else ../shared/data/omniglot."""
    root = Path(os.environ.get("FEWSHOT_DATA_ROOT") or SHARED_OMNIGLOT)
    if not (root / "images_background.zip").is_file():
        pytest.fail(f"Omniglot zips not found in {root}; set FEWSHOT_DATA_ROOT to their folder.")
    return root


@pytest.fixture(scope="session")
def omniglot(omniglot_root):
    from fewshot.datasets.omniglot import load_omniglot

    return load_omniglot(omniglot_root)


def write_random_image_folder(root: Path, channels: int = 1, size: int = 16) -> None:
    """A small --dataset folder of random-pixel PNGs: 4, 3 and 3 classes of 4 images in
    train/, val/ and test/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (size, size) if channels == 1 else (size, size, channels)
    for part, classes in (("train", 4), ("val", 3), ("test", 3)):
        for c in range(classes):
            for i in range(4):
                path = root / part / f"c{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
