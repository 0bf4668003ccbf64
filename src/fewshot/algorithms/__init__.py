"""Meta-learning methods; each is an `Algorithm` with `meta_loss` and `predict`."""

from fewshot.algorithms.base import Algorithm
from fewshot.algorithms.maml import MAML
from fewshot.algorithms.protonet import ProtoNet

__all__ = ["Algorithm", "MAML", "ProtoNet"]
