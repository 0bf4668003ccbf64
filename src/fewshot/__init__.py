"""fewshot: meta-learning for PyTorch."""

from fewshot.algorithms import MAML, Algorithm, ProtoNet
from fewshot.datasets import SinusoidTasks, load_omniglot, omniglot_split
from fewshot.models import Conv4, SinusoidMLP
from fewshot.tasks import Task, TaskSampler

__version__ = "0.1.0"

__all__ = [
    "MAML",
    "Algorithm",
    "Conv4",
    "ProtoNet",
    "SinusoidMLP",
    "SinusoidTasks",
    "Task",
    "TaskSampler",
    "load_omniglot",
    "omniglot_split",
]
