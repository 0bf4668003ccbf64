import os
from pathlib import Path

import pytest

from fewshot.files import atomic_write


def test_replaces_whole_file_with_umask_permissions(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    old_mask = os.umask(0o022)
    try:
        atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    finally:
        os.umask(old_mask)
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")

    def half_then_fail(tmp):
        Path(tmp).write_text("ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
