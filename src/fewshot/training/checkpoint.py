"""Run folders: the resolved configuration as JSON, metrics as JSON lines, weights as safetensors.

Nothing here unpickles: reading a run folder never runs code (building a run whose backbone is
a constructor imports its module, which `backbones.require_trusted` guards).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import fewshot
from fewshot.algorithms.registry import get_method
from fewshot.errors import CheckpointError, ConfigError
from fewshot.files import atomic_write, atomic_write_text
from fewshot.training.config import (
    TrainConfig,
    run_setting_names,
    without_other_datasets_settings,
)
from fewshot.training.state import first_non_finite

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
BEST_WEIGHTS = "model.safetensors"
LAST_WEIGHTS = "last.safetensors"
FORMAT_VERSION = 2  # 1: every method's settings in one flat list, whichever the method


def write_config(run_dir: Path, config: TrainConfig) -> None:
    document = {"format": FORMAT_VERSION, "fewshot": fewshot.__version__, **config.to_dict()}
    text = json.dumps(document, indent=2) + "\n"
    atomic_write_text(run_dir / CONFIG_FILE, text)


def read_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE}.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}).") from None
    version = document.pop("format", None) if isinstance(document, dict) else None
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(
            f"{path} was written by an incompatible fewshot version; this one reads formats 1 "
            f"and {FORMAT_VERSION}."
        )
    document.pop("fewshot", None)
    try:
        if version == 1:
            document = _settings_of_its_method(document)
        document = _with_settings_recorded_before(document)
        return TrainConfig.from_dict(without_other_datasets_settings(document)).resolved()
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None


def _settings_of_its_method(document: dict) -> dict:
    """A format-1 document without the settings of methods other than its own."""
    method = get_method(document.get("algorithm", "maml"))
    keep = set(run_setting_names()) | {f.name for f in fields(method.settings)}
    return {k: v for k, v in document.items() if k in keep}


def _with_settings_recorded_before(document: dict) -> dict:
    """A run folder's document with each setting it lacks that its method declares a
    `recorded_before` value for: a run recorded before that setting existed keeps the behaviour
    it was trained with, not today's default."""
    method = get_method(document.get("algorithm", "maml"))
    missing = {
        f.name: f.metadata["recorded_before"]
        for f in fields(method.settings)
        if f.name not in document and f.metadata.get("recorded_before") is not None
    }
    return {**document, **missing}


def save_weights(module: torch.nn.Module, path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    metadata = {"fewshot": fewshot.__version__}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a run's weights file into `module`; a missing, unreadable, damaged or ill-fitting
    file is refused in one line."""
    fit_weights(module, read_weights(path), path)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a run's weights file, refused if missing, unreadable or not finite."""
    run_dir = path.parent
    if not path.is_file():
        if (run_dir / CONFIG_FILE).is_file():  # a run that stopped before its first validation
            raise CheckpointError(
                f"{run_dir} has no checkpoint ({path.name}) yet: the run stopped before its "
                f"first validation; continue it with `fewshot train --resume {run_dir}`."
            )
        raise CheckpointError(
            f"{run_dir} has no checkpoint ({path.name}); train first with `fewshot train --out "
            f"{run_dir}`."
        )
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}).") from None
    damaged = first_non_finite(tensors)
    if damaged is not None:
        raise CheckpointError(
            f"{path} is damaged: {damaged} holds NaN or infinite values. Evaluate another run, "
            f"or train this one again with `fewshot train --out NEW_RUN`."
        )
    return tensors


def fit_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load `tensors`, read from `path`, into `module`; refused if they are another model's."""
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not fit this model: {first}") from None


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, skipping a line cut short by a kill."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {METRICS_FILE}; is it a run folder?")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
