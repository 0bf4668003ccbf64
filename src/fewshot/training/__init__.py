"""Training loop, evaluation protocol and run folders."""

from fewshot.training.config import TrainConfig
from fewshot.training.evaluation import EvalResult, evaluate
from fewshot.training.loading import load_run
from fewshot.training.loop import meta_step, train

__all__ = ["EvalResult", "TrainConfig", "evaluate", "load_run", "meta_step", "train"]
