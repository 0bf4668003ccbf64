"""Run folders: the resolved configuration as JSON, metrics as JSON lines, weights as safetensors.

Nothing here unpickles: loading a run folder can never run code.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import fewshot
from fewshot.algorithms.registry import get_method
from fewshot.errors import CheckpointError, ConfigError
from fewshot.files import atomic_write
from fewshot.training.config import TrainConfig, run_setting_names

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
BEST_WEIGHTS = "model.safetensors"
LAST_WEIGHTS = "last.safetensors"
FORMAT_VERSION = 2  # 1: every method's settings in one flat list, whichever the method


def write_config(run_dir: Path, config: TrainConfig) -> None:
    document = {"format": FORMAT_VERSION, "fewshot": fewshot.__version__, **config.to_dict()}
    text = json.dumps(document, indent=2) + "\n"
    atomic_write(run_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
        return TrainConfig.from_dict(document).resolved()
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None


def _settings_of_its_method(document: dict) -> dict:
    """A format-1 document without the settings of methods other than its own."""
    method = get_method(document.get("algorithm", "maml"))
    keep = set(run_setting_names()) | {f.name for f in fields(method.settings)}
    return {k: v for k, v in document.items() if k in keep}


def save_weights(module: torch.nn.Module, path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    metadata = {"fewshot": fewshot.__version__}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_weights(module: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"{path.parent} has no checkpoint ({path.name}); train first with `fewshot train --out "
            f"{path.parent}`, or let a run reach its first validation."
        )
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}).") from None
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not fit this model: {first}") from None


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
