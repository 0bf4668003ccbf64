"""The registry of parity references: method name -> how to build its reference.

Adding a reference is ONE registration here: a `ReferenceSpec` naming the module (imported
only when the method is run, so a reference whose library is missing does not break the
others) and the function in it that builds a `Reference` from fewshot's resolved `TrainConfig`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from fewshot.training.config import TrainConfig

from .base import Reference


@dataclass(frozen=True)
class ReferenceSpec:
    """Where a method's reference lives and what the harness must match on fewshot's side.

    `module`: a module of this package (e.g. ".learn2learn"); `builder`: the function in it,
    called as `builder(method, config) -> Reference`; `repository` and `version`: where the
    reference's code comes from (recorded in the results); `fewshot_flags`: extra `fewshot
    train` flags that make fewshot's episodes and settings match the reference's.
    """

    module: str
    builder: str
    repository: str
    version: str
    fewshot_flags: tuple[str, ...] = field(default=())


LEARN2LEARN = ("https://github.com/learnables/learn2learn", "0.2.0")
NICHOL = ("https://arxiv.org/abs/1803.02999 (Algorithm 2)", "transcription")

REFERENCES: dict[str, ReferenceSpec] = {
    "maml": ReferenceSpec(".learn2learn", "build", *LEARN2LEARN),
    "fomaml": ReferenceSpec(".learn2learn", "build", *LEARN2LEARN, ("--first-order",)),
    "meta-sgd": ReferenceSpec(".learn2learn", "build", *LEARN2LEARN),
    "anil": ReferenceSpec(".learn2learn", "build", *LEARN2LEARN),
    "reptile": ReferenceSpec(".reptile", "build", *NICHOL),
}

# fewshot's algorithm name for a parity method where they differ (FOMAML is MAML's switch).
ALGORITHMS: dict[str, str] = {"fomaml": "maml"}


def algorithm_of(method: str) -> str:
    """The `fewshot train --algorithm` a parity method runs."""
    return ALGORITHMS.get(method, method)


def build(method: str, config: TrainConfig) -> Reference:
    """The reference of `method`, built for fewshot's resolved configuration `config`."""
    if method not in REFERENCES:
        raise KeyError(f"no parity reference for {method!r}; known: {', '.join(REFERENCES)}")
    spec = REFERENCES[method]
    module = importlib.import_module(spec.module, __name__)
    return getattr(module, spec.builder)(method, config)


__all__ = ["REFERENCES", "Reference", "ReferenceSpec", "algorithm_of", "build"]
