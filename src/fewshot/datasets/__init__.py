"""Few-shot data sources: sinusoid regression, Omniglot, image folders, tables and the field's
image benchmarks. Each module that defines a dataset registers it (`registry`); the imports
below are the registrations, in the order `--dataset` lists them."""

# isort: off
from fewshot.datasets.sinusoid import SinusoidExamples, SinusoidTasks
from fewshot.datasets.omniglot import load_omniglot, omniglot_split, resolve_data_root
from fewshot.datasets import image_folder, table
from fewshot.datasets.benchmarks import BENCHMARKS, load_benchmark

# isort: on
from fewshot.datasets.registry import DATASETS, Dataset, get_dataset, register

__all__ = [
    "BENCHMARKS",
    "DATASETS",
    "Dataset",
    "SinusoidExamples",
    "SinusoidTasks",
    "get_dataset",
    "image_folder",
    "load_benchmark",
    "load_omniglot",
    "omniglot_split",
    "register",
    "resolve_data_root",
    "table",
]
