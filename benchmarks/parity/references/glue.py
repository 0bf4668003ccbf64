"""What the parity references share: where fetch_references.sh puts a reference's checkout,
how its modules are imported from it, and a fewshot task in the class-major layout that Chen et
al.'s and Antoniou et al.'s code take (and their per-query rows back in fewshot's order)."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

FETCH_SCRIPT = "benchmarks/parity/fetch_references.sh"


@contextlib.contextmanager
def quiet(messages: tuple[str, ...]) -> Iterator[None]:
    """Silence the warnings whose messages start with one of `messages` (their old code on a
    current PyTorch): the behaviour those warnings name is the one their code was written for."""
    with warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=re.escape(message))
        yield


def checkout(name: str) -> Path:
    """Where fetch_references.sh puts a reference's code."""
    root = os.environ.get("FEWSHOT_REFERENCES") or Path.home() / ".cache" / "fewshot-references"
    return Path(root) / name


def import_checkout(
    root: Path,
    commit: str,
    names: tuple[str, ...],
    stubs: tuple[str, ...] = (),
    messages: tuple[str, ...] = (),
) -> dict:
    """Their top-level modules `names`, imported from the checkout `root` (at `commit`), on a
    clean slate: modules of the same names imported before (another reference's `utils`) are
    set aside while theirs import, and put back after, so references do not shadow each other.
    `stubs`: names to stand in for modules they import but never use here; `messages`: their
    warnings to silence while importing."""
    if not (root / f"{names[0]}.py").is_file():
        raise ImportError(f"{root.name} is not checked out in {root}: run {FETCH_SCRIPT}")
    head = root / ".git" / "HEAD"
    at = head.read_text().strip() if head.is_file() else commit
    if len(at) == 40 and at != commit:
        raise ImportError(f"{root} is at commit {at}, not {commit}: run {FETCH_SCRIPT}")
    own = {path.stem for path in root.glob("*.py")} | set(stubs)
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in own}
    sys.path.insert(0, str(root))
    try:
        for name in stubs:
            sys.modules[name] = stub_module(name)
        with quiet(messages):
            modules = {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] in own]:
            del sys.modules[name]
        sys.modules.update(saved)
    for name, module in modules.items():
        if not Path(module.__file__).resolve().is_relative_to(root.resolve()):
            raise ImportError(f"{name} comes from {module.__file__}, not from {root}")
    return modules


def stub_module(name: str) -> ModuleType:
    """An empty module `name` whose every attribute is a function that raises if called."""

    def unavailable(attribute: str):
        def function(*args, **kwargs):
            raise RuntimeError(f"{name}.{attribute} is not available to the parity harness")

        return function

    module = ModuleType(name)
    module.__getattr__ = unavailable
    return module


def class_major(
    support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One task class-major: support (ways, shots, ...), queries (ways, queries, ...), row c
    holding class c's examples in the order given; and the order of fewshot's queries in
    theirs (their query i, counted class-major, is fewshot's query `order[i]`)."""
    ways = int(support_y.max()) + 1
    shots = torch.bincount(support_y, minlength=ways)
    queries = torch.bincount(query_y, minlength=ways)
    if int(support_y.min()) < 0 or (shots == 0).any():
        raise ValueError(f"support labels must cover 0..{ways - 1}, got {support_y.tolist()}")
    if len(queries) != ways or int(query_y.min()) < 0:
        raise ValueError(f"query labels must lie in 0..{ways - 1}, got {query_y.tolist()}")
    if (shots != shots[0]).any() or (queries != queries[0]).any():
        raise ValueError(
            f"their layout needs as many support examples ({shots.tolist()}) and as many "
            f"queries ({queries.tolist()}) in every class"
        )
    support_order = torch.argsort(support_y, stable=True)
    query_order = torch.argsort(query_y, stable=True)
    support = support_x[support_order].reshape(ways, int(shots[0]), *support_x.shape[1:])
    query = query_x[query_order].reshape(ways, int(queries[0]), *query_x.shape[1:])
    return support, query, query_order


def fewshot_order(scores: torch.Tensor, query_order: torch.Tensor) -> torch.Tensor:
    """Their per-query rows (class-major) back in fewshot's query order."""
    out = torch.empty_like(scores)
    out[query_order] = scores
    return out
