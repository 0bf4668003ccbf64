"""The package's own facts: one version, the license, the type-hint marker."""

from importlib import metadata
from pathlib import Path

from click.testing import CliRunner

import fewshot
from fewshot.cli import main
from tests.conftest import REPO


def test_the_version_is_written_once_and_reported_everywhere():
    assert fewshot.__version__ == metadata.version("fewshot")
    result = CliRunner().invoke(main, ["--version"], prog_name="fewshot")
    assert result.exit_code == 0 and result.output == f"fewshot, version {fewshot.__version__}\n"


def test_the_package_ships_its_type_hints_and_license():
    assert (Path(fewshot.__file__).parent / "py.typed").is_file()
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert metadata.metadata("fewshot")["License-Expression"] == "MIT"
