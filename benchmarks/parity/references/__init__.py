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
NICHOL = ("transcription of Nichol et al. 2018, Algorithm 2", "(arXiv:1803.02999v3)")
# Chen et al. 2019's code, checked out by benchmarks/parity/fetch_references.sh
CLOSERLOOK = (
    "https://github.com/wyharveychen/CloserLookFewShot",
    "e03aca8a2d01c9b5861a5a816cd5d3fdfc47cd45",
)

# Antoniou et al. 2019's MAML++ and markdtw's Meta-LSTM, checked out the same way
HOWTOTRAIN = (
    "https://github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch",
    "86964701651c06e490271365fedb8789a72ef3f0",
)
MARKDTW = (
    "https://github.com/markdtw/meta-learning-lstm-pytorch",
    "fcc68baad71a3293edeb227a1676de9e9edea9c3",
)

REFERENCES: dict[str, ReferenceSpec] = {
    "maml": ReferenceSpec(".learn2learn", "build", *LEARN2LEARN),
    "fomaml": ReferenceSpec(".learn2learn", "build", *LEARN2LEARN, ("--first-order",)),
    "meta-sgd": ReferenceSpec(".learn2learn", "build", *LEARN2LEARN),
    "anil": ReferenceSpec(".learn2learn", "build", *LEARN2LEARN),
    "reptile": ReferenceSpec(".reptile", "build", *NICHOL),
    # the zoo's MAML++ epochs (zoo/mamlpp-omniglot-5w1s), which both sides' schedules count
    "maml++": ReferenceSpec(".howtotrain", "build", *HOWTOTRAIN, ("--iterations-per-epoch", "20")),
    # their learner is a Conv4 of 32 filters
    "meta-lstm": ReferenceSpec(".metalstm_markdtw", "build", *MARKDTW, ("--backbone", "conv4-32")),
    "protonet": ReferenceSpec(".closerlook", "build", *CLOSERLOOK),
    # their MatchingNet always has the full context embeddings and scales cosines by 100
    "matchingnet": ReferenceSpec(
        ".closerlook", "build", *CLOSERLOOK, ("--full-context", "--similarity-scale", "100")
    ),
    "relationnet": ReferenceSpec(".closerlook", "build", *CLOSERLOOK),
    "baseline": ReferenceSpec(".closerlook", "build", *CLOSERLOOK),
    "baseline++": ReferenceSpec(".closerlook", "build", *CLOSERLOOK),
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
