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
