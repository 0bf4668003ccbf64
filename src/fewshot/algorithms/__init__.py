"""Meta-learning methods. Each module defines one method and registers it (`registry`); the
imports below are the registrations."""

# MAML first: the registration order is the order of listings (`fewshot methods`, help texts)
from fewshot.algorithms import maml  # noqa: F401
from fewshot.algorithms.anil import ANIL
from fewshot.algorithms.base import Algorithm, Predictor
from fewshot.algorithms.baseline import Baseline, BaselinePlusPlus, CosineClassifier
from fewshot.algorithms.finetune import FineTune
from fewshot.algorithms.finetuning import TransferLearner
from fewshot.algorithms.gradient import GradientLearner, current_inner_step
from fewshot.algorithms.maml import MAML
from fewshot.algorithms.mamlpp import MAMLpp
from fewshot.algorithms.matchingnet import MatchingNet
from fewshot.algorithms.metalstm import MetaLSTM
from fewshot.algorithms.metasgd import MetaSGD
from fewshot.algorithms.metric import MetricLearner, SupportFineTuning
from fewshot.algorithms.protonet import ProtoNet
from fewshot.algorithms.registry import METHODS, Method, Settings, get_method, register
from fewshot.algorithms.relationnet import RelationNet
from fewshot.algorithms.reptile import Reptile

__all__ = [
    "ANIL",
    "METHODS",
    "MAML",
    "MAMLpp",
    "Algorithm",
    "Baseline",
    "BaselinePlusPlus",
    "CosineClassifier",
    "FineTune",
    "GradientLearner",
    "MatchingNet",
    "Method",
    "MetaLSTM",
    "MetaSGD",
    "MetricLearner",
    "Predictor",
    "ProtoNet",
    "RelationNet",
    "Reptile",
    "Settings",
    "SupportFineTuning",
    "TransferLearner",
    "current_inner_step",
    "get_method",
    "register",
]
