"""Run by torchrun from test_distributed.py: `fewshot train`, with process 1 raising at its
fifth training step (an injected fault), to check that the whole job then ends promptly."""

from __future__ import annotations

import os
import sys

from fewshot.algorithms.gradient import GradientLearner
from fewshot.cli import main

FAILING_STEP = 5


def fail_at_step(step: int) -> None:
    """Make every gradient-based learner's training step number `step` raise."""
    original = GradientLearner.training_step
    counter = iter(range(1, sys.maxsize))

    def training_step(self, tasks):
        if next(counter) == step:
            raise RuntimeError(f"injected failure in process 1 at step {step}")
        return original(self, tasks)

    GradientLearner.training_step = training_step


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        fail_at_step(FAILING_STEP)
    sys.exit(main())
