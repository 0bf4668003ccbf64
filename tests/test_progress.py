"""Progress: a redrawn bar on a terminal, plain lines in logs."""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner

from fewshot.cli import main
from fewshot.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_outside_a_terminal_progress_is_plain_lines_with_the_time_left():
    log = io.StringIO()
    for _ in progress_bar(range(4), desc="meta-training", file=log, interval=0):
        pass
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[-1].startswith("meta-training: 4/4 (100%), ")
    assert all(line.startswith("meta-training: ") and " left, " in line for line in lines)
    assert "meta-training: 2/4 (50%)" in text


def test_outside_a_terminal_short_work_prints_no_line():
    log = io.StringIO()
    for _ in progress_bar(range(1000), desc="work", file=log, interval=60):
        pass
    assert log.getvalue() == ""  # shorter than the interval: no line at all


def test_on_a_terminal_the_bar_is_redrawn_in_place():
    screen = Terminal()
    for _ in progress_bar(range(3), desc="work", file=screen):
        pass
    assert "\r" in screen.getvalue()


@pytest.mark.slow
def test_a_training_log_holds_no_carriage_returns(tmp_path):
    result = CliRunner().invoke(
        main,
        ["train", "--iterations", "20", "--val-every", "10", "--val-episodes", "10",
         "--test-episodes", "10", "--out", str(tmp_path / "run")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
