"""Everything needed to resume a run exactly, in one safetensors file written atomically.

Tensors (weights, optimizer moments, random-generator states) are stored as tensors; the rest
(iteration, best result, optimizer hyper-parameters, Python and NumPy generator states) as JSON
in the file's metadata. Loading parses JSON and raw tensors only, so it can never run code.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fewshot.errors import CheckpointError
from fewshot.files import atomic_write

STATE_FILE = "state.safetensors"


@dataclass
class TrainingState:
    """A run between two iterations: `iteration` outer updates are done."""

    iteration: int
    algorithm: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    sampler_rng: torch.Tensor
    torch_rng: torch.Tensor
    python_rng: Any
    numpy_rng: Any
    best: dict | None
    elapsed: float
    scheduler: dict | None = None  # the outer learning-rate schedule's state, if any
    cuda_rng: list[torch.Tensor] = field(default_factory=list)  # one per CUDA device, if any
    # A distributed run's processes (the fields above are rank 0's generators) and the
    # generators of ranks 1, 2, ... (`capture_rngs`), which each draw their own tasks.
    processes: int = 1
    other_ranks: list[dict] = field(default_factory=list)

    def rngs(self, rank: int) -> dict:
        """The generator states of process `rank`, as `capture_rngs` gives them."""
        if rank > 0:
            return self.other_ranks[rank - 1]
        return {
            "sampler_rng": self.sampler_rng,
            "torch_rng": self.torch_rng,
            "python_rng": self.python_rng,
            "numpy_rng": self.numpy_rng,
            "cuda_rng": self.cuda_rng,
        }


def capture_global_rngs() -> tuple[torch.Tensor, Any, Any]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def capture_rngs(sampler: torch.Generator) -> dict:
    """This process's generator states: its task sampler's, torch's, Python's, NumPy's (as
    JSON-ready lists) and CUDA's."""
    torch_rng, python_rng, numpy_rng = capture_global_rngs()
    name, keys, *rest = numpy_rng
    return {
        "sampler_rng": sampler.get_state(),
        "torch_rng": torch_rng,
        "python_rng": python_rng,
        "numpy_rng": [name, np.asarray(keys).tolist(), *rest],
        "cuda_rng": capture_cuda_rngs(),
    }


def restore_rngs(rngs: dict, sampler: torch.Generator) -> None:
    """Put back the generator states `capture_rngs` took."""
    sampler.set_state(rngs["sampler_rng"])
    restore_global_rngs(rngs)


def capture_cuda_rngs() -> list[torch.Tensor]:
    """The generator state of every CUDA device (none without CUDA): dropout and other random
    draws on a GPU come from these, not from the CPU generator."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def restore_global_rngs(rngs: TrainingState | dict) -> None:
    """Put back torch's, CUDA's, Python's and NumPy's generators (rank 0's, from a state)."""
    if isinstance(rngs, TrainingState):
        rngs = rngs.rngs(0)
    torch.set_rng_state(rngs["torch_rng"])
    # Restored where the same number of CUDA devices is there; on another machine they cannot
    # match anyway.
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if rngs["cuda_rng"] and devices == len(rngs["cuda_rng"]):
        torch.cuda.set_rng_state_all(rngs["cuda_rng"])
    version, internal, gauss = rngs["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rngs["numpy_rng"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_state(path: Path, state: TrainingState) -> None:
    tensors: dict[str, torch.Tensor] = {}
    document = {
        "iteration": state.iteration,
        "algorithm": _pack(state.algorithm, "algorithm", tensors),
        "optimizer": _pack(state.optimizer, "optimizer", tensors),
        "sampler_rng": _pack(state.sampler_rng, "sampler_rng", tensors),
        "torch_rng": _pack(state.torch_rng, "torch_rng", tensors),
        "python_rng": state.python_rng,
        "numpy_rng": [
            state.numpy_rng[0],
            np.asarray(state.numpy_rng[1]).tolist(),
            *state.numpy_rng[2:],
        ],
        "best": state.best,
        "elapsed": state.elapsed,
        "scheduler": _pack(state.scheduler, "scheduler", tensors),
        "cuda_rng": _pack(state.cuda_rng, "cuda_rng", tensors),
        "processes": state.processes,
        "other_ranks": _pack(state.other_ranks, "other_ranks", tensors),
    }
    metadata = {"state": json.dumps(document)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def saved_iteration(path: Path) -> int:
    """The iteration a resumable checkpoint was written at, read from its header alone (no
    tensor is loaded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["state"])["iteration"]
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} is not a readable fewshot checkpoint ({error}).") from None


def load_state(path: Path) -> TrainingState:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no resumable checkpoint ({path.name}).")
    try:
        with safe_open(str(path), framework="pt") as f:
            document = json.loads((f.metadata() or {})["state"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        refuse_non_finite(path, tensors)
        return TrainingState(
            iteration=document["iteration"],
            algorithm=_unpack(document["algorithm"], tensors),
            optimizer=_unpack(document["optimizer"], tensors),
            sampler_rng=_unpack(document["sampler_rng"], tensors),
            torch_rng=_unpack(document["torch_rng"], tensors),
            python_rng=document["python_rng"],
            numpy_rng=document["numpy_rng"],
            best=document["best"],
            elapsed=document["elapsed"],
            scheduler=_unpack(document.get("scheduler"), tensors),
            cuda_rng=_unpack(document.get("cuda_rng", []), tensors),  # absent before they were kept
            processes=document.get("processes", 1),
            other_ranks=_unpack(document.get("other_ranks", []), tensors),
        )
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} is not a readable fewshot checkpoint ({error}).") from None


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or inf, None if all are finite: training
    never saves such weights or checkpoints (it stops before a non-finite update), so a file
    that holds them is damaged."""
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


def refuse_non_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint with NaN or inf anywhere is damaged (training never saves one): resuming
    it would only continue from garbage."""
    damaged = first_non_finite(tensors)
    if damaged is not None:
        raise CheckpointError(
            f"{path} is damaged: {damaged} holds NaN or infinite values, so the run cannot be "
            f"resumed; train it again with `fewshot train --out NEW_RUN`."
        )


def _pack(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON form of nested dicts/lists, with each tensor moved to `tensors` under a path key."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        # Keys keep their type (optimizer state is keyed by int), so store them as pairs.
        return {"__items__": [[k, _pack(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_pack(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__items__" in value:
        return {k: _unpack(v, tensors) for k, v in value["__items__"]}
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    return value
