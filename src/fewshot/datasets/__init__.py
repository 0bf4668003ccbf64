"""Few-shot data sources: sinusoid regression and Omniglot."""

from fewshot.datasets.omniglot import load_omniglot, omniglot_split, resolve_data_root
from fewshot.datasets.sinusoid import SinusoidTasks

__all__ = ["SinusoidTasks", "load_omniglot", "omniglot_split", "resolve_data_root"]
