"""Few-shot data sources: sinusoid regression and Omniglot."""

from fewshot.datasets.omniglot import load_omniglot, omniglot_split, resolve_data_root
from fewshot.datasets.sinusoid import SinusoidExamples, SinusoidTasks

__all__ = [
    "SinusoidExamples",
    "SinusoidTasks",
    "load_omniglot",
    "omniglot_split",
    "resolve_data_root",
]
