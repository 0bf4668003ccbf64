"""fewshot: meta-learning for PyTorch."""

from fewshot.algorithms import (
    ANIL,
    MAML,
    Algorithm,
    Baseline,
    BaselinePlusPlus,
    FineTune,
    GradientLearner,
    MAMLpp,
    MatchingNet,
    MetaLSTM,
    MetaSGD,
    MetricLearner,
    Predictor,
    ProtoNet,
    RelationNet,
    Reptile,
    SupportFineTuning,
)
from fewshot.datasets import SinusoidTasks, load_omniglot, omniglot_split
from fewshot.models import Conv4, SinusoidMLP
from fewshot.tasks import Batch, ExampleSampler, Support, Task, TaskSampler
from fewshot.training.loading import load

__version__ = "0.1.0"

__all__ = [
    "ANIL",
    "MAML",
    "MAMLpp",
    "Algorithm",
    "Baseline",
    "BaselinePlusPlus",
    "Batch",
    "Conv4",
    "ExampleSampler",
    "FineTune",
    "GradientLearner",
    "MatchingNet",
    "MetaLSTM",
    "MetaSGD",
    "MetricLearner",
    "Predictor",
    "ProtoNet",
    "RelationNet",
    "Reptile",
    "SinusoidMLP",
    "SinusoidTasks",
    "Support",
    "SupportFineTuning",
    "Task",
    "TaskSampler",
    "load",
    "load_omniglot",
    "omniglot_split",
]
