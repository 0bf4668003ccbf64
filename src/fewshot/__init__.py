"""fewshot: meta-learning for PyTorch."""

from fewshot.algorithms import (
    ANIL,
    MAML,
    Algorithm,
    GradientLearner,
    MAMLpp,
    MetaLSTM,
    MetaSGD,
    MetricLearner,
    Predictor,
    ProtoNet,
    Reptile,
)
from fewshot.datasets import SinusoidTasks, load_omniglot, omniglot_split
from fewshot.models import Conv4, SinusoidMLP
from fewshot.tasks import Task, TaskSampler

__version__ = "0.1.0"

__all__ = [
    "ANIL",
    "MAML",
    "MAMLpp",
    "Algorithm",
    "Conv4",
    "GradientLearner",
    "MetaLSTM",
    "MetaSGD",
    "MetricLearner",
    "Predictor",
    "ProtoNet",
    "Reptile",
    "SinusoidMLP",
    "SinusoidTasks",
    "Task",
    "TaskSampler",
    "load_omniglot",
    "omniglot_split",
]
