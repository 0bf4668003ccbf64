"""Console output of long work: progress (training, evaluation, tuning, dataset preparation)
with the time left, and plain tables.

On a terminal it is a tqdm bar redrawn in place. Anywhere else (a log file, a cluster job's
output) redrawing would pile thousands of carriage-return frames into one line, so it prints a
plain line every `PLAIN_INTERVAL` seconds instead, and one when work that lasted longer ends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO

from tqdm import tqdm

PLAIN_INTERVAL = 30.0  # seconds between two plain lines
PLAIN_FORMAT = (
    "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left, "
    "{rate_fmt}{postfix}"
)


class PlainLines:
    """A file for tqdm that turns each redraw ("\\r" + the bar) into one line of its own."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file

    def write(self, text: str) -> None:
        text = text.replace("\x1b[A", "").replace("\r", "").strip()
        if text:
            self.file.write(text + "\n")

    def flush(self) -> None:
        self.file.flush()


def is_terminal(file: IO[str]) -> bool:
    try:
        return file.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # closed or file-like objects without a descriptor
        return False


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: float | None = None,
    initial: float = 0,
    disable: bool = False,
    leave: bool = True,
    unit: str = "it",
    unit_scale: bool = False,
    file: IO[str] | None = None,
    interval: float = PLAIN_INTERVAL,
) -> tqdm:
    """A tqdm progress bar on a terminal, plain lines every `interval` seconds elsewhere."""
    file = sys.stderr if file is None else file
    common = dict(
        desc=desc,
        total=total,
        initial=initial,
        disable=disable,
        leave=leave,
        unit=unit,
        unit_scale=unit_scale,
    )
    if is_terminal(file):
        return tqdm(iterable, file=file, dynamic_ncols=True, **common)
    return tqdm(
        iterable,
        file=PlainLines(file),
        mininterval=interval,
        maxinterval=interval,
        delay=interval,  # work shorter than that leaves no line, and none says "0%, ? left"
        bar_format=PLAIN_FORMAT,
        **common,
    )


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart, a header line first (for trials, predictions)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows]
    )
