"""Few-shot data sources: sinusoid regression, Omniglot and the field's image benchmarks."""

from fewshot.datasets.benchmarks import BENCHMARKS, load_benchmark
from fewshot.datasets.omniglot import load_omniglot, omniglot_split, resolve_data_root
from fewshot.datasets.sinusoid import SinusoidExamples, SinusoidTasks

__all__ = [
    "BENCHMARKS",
    "SinusoidExamples",
    "SinusoidTasks",
    "load_benchmark",
    "load_omniglot",
    "omniglot_split",
    "resolve_data_root",
]
