import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
# Why the Omniglot tests were skipped, where they were (for the summary's one line).
_OMNIGLOT_SKIP_REASON = pytest.StashKey[str]()


def omniglot_folder() -> Path:
    """Where the Omniglot zips are read from: $FEWSHOT_DATA_ROOT, else ../shared/data/omniglot."""
    return Path(os.environ.get("FEWSHOT_DATA_ROOT") or SHARED_OMNIGLOT)


def missing_omniglot() -> str | None:
    """Why the Omniglot tests cannot run (the zips are not there), or None."""
    root = omniglot_folder()
    if (root / "images_background.zip").is_file():
        return None
    return f"Omniglot zips not found in {root}; set FEWSHOT_DATA_ROOT to their folder."


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n 2`), each worker, and each process a test starts, computes on one
    thread: two workers with torch's default of a thread per core would oversubscribe them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reads Omniglot through its fixtures carries the `omniglot` marker even where
    it does not say so. Without the zips, outside CI, every `omniglot` test is skipped: a
    developer without them can still run the rest (under CI, `omniglot_root` fails them)."""
    for item in items:
        if {"omniglot", "omniglot_root"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.omniglot)
    reason = missing_omniglot()
    if reason is None or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("omniglot"):
            item.add_marker(skip)
    config.stash[_OMNIGLOT_SKIP_REASON] = reason


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """One line for all the Omniglot tests skipped for want of the zips."""
    reason = config.stash.get(_OMNIGLOT_SKIP_REASON, None)
    if reason is None:
        return
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if reason in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} Omniglot tests skipped: {reason}")


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """Folder with Omniglot's official zips: $FEWSHOT_DATA_ROOT, else ../shared/data/omniglot."""
    reason = missing_omniglot()
    if reason is not None:
        pytest.fail(reason)  # only under CI: elsewhere the tests were skipped at collection
    return omniglot_folder()


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
