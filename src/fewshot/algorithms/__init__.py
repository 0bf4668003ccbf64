"""Meta-learning methods. Each module defines one method and registers it (`registry`); the
imports below are the registrations."""

from fewshot.algorithms.anil import ANIL
from fewshot.algorithms.base import Algorithm, Predictor
from fewshot.algorithms.gradient import GradientLearner, current_inner_step
from fewshot.algorithms.maml import MAML
from fewshot.algorithms.mamlpp import MAMLpp
from fewshot.algorithms.metalstm import MetaLSTM
from fewshot.algorithms.metasgd import MetaSGD
from fewshot.algorithms.metric import MetricLearner
from fewshot.algorithms.protonet import ProtoNet
from fewshot.algorithms.registry import METHODS, Method, Settings, get_method, register
from fewshot.algorithms.reptile import Reptile

__all__ = [
    "ANIL",
    "METHODS",
    "MAML",
    "MAMLpp",
    "Algorithm",
    "GradientLearner",
    "Method",
    "MetaLSTM",
    "MetaSGD",
    "MetricLearner",
    "Predictor",
    "ProtoNet",
    "Reptile",
    "Settings",
    "current_inner_step",
    "get_method",
    "register",
]
