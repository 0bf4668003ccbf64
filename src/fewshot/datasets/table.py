"""Your own tabular data: few-shot classification of the rows of a CSV file.

`--dataset csv --data-root FILE.csv --label-column NAME`: the file has a header row; the label
column names each row's class, every other column is a numeric feature. The classes (not the
rows) are split into meta-training, validation and meta-test parts, so every test episode is
made of classes never seen in training: sorted by name, shuffled with `random.Random(0)`, and cut
60% / 20% / 20%. Features are standardised with the mean and standard deviation of the training
part's rows (the only statistics a model may learn from).
"""

from __future__ import annotations

import csv
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot.datasets.registry import Dataset, register
from fewshot.errors import ConfigError, DataError

PARTS = ("train", "val", "test")
DEFAULT_CLASS_SPLIT = "0.6,0.2,0.2"
MISSING = {"", "na", "n/a", "nan", "null", "none", "?"}


@dataclass(frozen=True)
class Table:
    """A CSV file's rows: features (n, d) float32, labels (n,) indices into `classes`."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    columns: list[str]


def load_table(path: str | os.PathLike, label_column: str) -> Table:
    """Read a CSV file with a header row; refuses missing or non-numeric values with a line
    naming the row and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"`data_root={path}`: no such CSV file.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(
            f"{path} is not a readable CSV file ({error}); save it as UTF-8 CSV text."
        ) from None
    if len(rows) < 2:
        raise DataError(f"{path} has no data rows below its header.")
    header = [name.strip() for name in rows[0]]
    if label_column not in header:
        raise DataError(
            f"{path} has no column {label_column!r}; its columns are {', '.join(header)}."
        )
    label_at = header.index(label_column)
    columns = [name for i, name in enumerate(header) if i != label_at]
    if not columns:
        raise DataError(f"{path} has no feature column besides {label_column!r}.")
    features, names = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) != len(header):
            raise DataError(
                f"{path}, line {line}: {len(row)} values, the header has {len(header)}."
            )
        if not row[label_at].strip():
            raise DataError(f"{path}, line {line}: the {label_column!r} value is missing.")
        names.append(row[label_at].strip())
        features.append(
            [_number(path, line, header[i], c) for i, c in enumerate(row) if i != label_at]
        )
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    return Table(
        torch.tensor(features, dtype=torch.float32),
        torch.tensor([index[name] for name in names]),
        classes,
        columns,
    )


def table_parts(
    table: Table, parts: tuple[str, ...], class_split: str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of each requested part, standardised with the training part's rows."""
    chosen = split_classes(table.classes, class_split)
    train = torch.isin(table.labels, torch.tensor(chosen["train"]))
    mean = table.features[train].mean(0)
    std = table.features[train].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant columns stay at zero
    out = []
    for part in parts:
        rows = torch.isin(table.labels, torch.tensor(chosen[part], dtype=torch.long))
        out.append(((table.features[rows] - mean) / std, table.labels[rows]))
    return out


def class_fractions(class_split: str | None) -> dict[str, float]:
    """The shares of the classes of each part, from "TRAIN,VAL,TEST" (e.g. "0.6,0.2,0.2")."""
    text = DEFAULT_CLASS_SPLIT if class_split is None else class_split
    try:
        shares = [float(value) for value in text.split(",")]
    except ValueError:
        shares = []
    if len(shares) != 3 or min(shares) <= 0 or abs(sum(shares) - 1) > 1e-6:
        raise ConfigError(
            f"`class_split={text}` is not three positive shares of the classes that add up to "
            f"1, for meta-training, validation and meta-test (e.g. {DEFAULT_CLASS_SPLIT})."
        )
    return dict(zip(PARTS, shares, strict=True))


def split_classes(classes: list[str], class_split: str | None = None) -> dict[str, list[int]]:
    """Class indices of each part: sorted names, shuffled with a fixed seed, cut by the shares
    of `class_split` (0.6, 0.2 and 0.2 unless given)."""
    fractions = class_fractions(class_split)
    order = list(range(len(classes)))  # `classes` is sorted
    random.Random(0).shuffle(order)
    n_train = math.floor(len(order) * fractions["train"])
    n_val = math.floor(len(order) * fractions["val"])
    sizes = {"train": n_train, "val": n_val, "test": len(order) - n_train - n_val}
    if min(sizes.values()) < 2:
        counts = ", ".join(f"{part} {n}" for part, n in sizes.items())
        raise DataError(
            f"the table's {len(classes)} classes split by `class_split` "
            f"({class_split or DEFAULT_CLASS_SPLIT}) give {counts}: each part needs 2 or more; "
            "give the small parts larger shares with `class_split`, or use a table of more "
            "classes."
        )
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def check_ways(held_out_sizes: dict[str, int], config, table_classes: int) -> None:
    """Each held-out part has the `ways` classes its episodes draw, or the refusal says which
    option gives it more."""
    for part, classes in held_out_sizes.items():
        if classes < config.ways and config.sampler != "meta-dataset":
            raise DataError(
                f"the {part} part has {classes} of the table's {table_classes} classes "
                f"(`class_split={config.class_split or DEFAULT_CLASS_SPLIT}`), fewer than "
                f"`ways={config.ways}`; give it a larger share with `class_split`, or lower "
                "`ways`."
            )


def _number(path: Path, line: int, column: str, cell: str) -> float:
    if cell.strip().lower() in MISSING:
        raise DataError(
            f"{path}, line {line}, column {column!r}: the value is missing; fill it in or drop "
            "the row."
        )
    try:
        value = float(cell)
    except ValueError:
        raise DataError(
            f"{path}, line {line}, column {column!r}: {cell.strip()!r} is not a number; "
            "features must be numeric (encode categories as numbers, or drop the column)."
        ) from None
    if not math.isfinite(value):
        raise DataError(
            f"{path}, line {line}, column {column!r}: {cell.strip()!r} is not a finite number."
        )
    return value


def load_parts(config, data_root: Path | None, download: bool, parts: tuple[str, ...]):
    """(rows, labels, None) of each part of the CSV file `data_root`."""
    if data_root is None:
        raise DataError("`dataset=csv` needs `data_root=FILE.csv`.")
    table = load_table(data_root, config.label_column)
    loaded = table_parts(table, parts, config.class_split)
    held_out = {part: len(y.unique()) for part, (_, y) in zip(parts, loaded) if part != "train"}
    check_ways(held_out, config, len(table.classes))
    return [(x, y, None) for x, y in loaded]


register(
    Dataset(
        "csv",
        task="classification",
        inputs="tables",
        network="table-mlp",
        defaults_from=("omniglot",),
        settings=("label_column", "class_split", "features", "sampler"),
        values={"sampler": "fixed"},
        required={"label_column": "NAME, the column of each row's class"},
        load=load_parts,
        from_data=("features",),
    )
)
