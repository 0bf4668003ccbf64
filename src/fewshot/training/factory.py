"""Build the task samplers and the algorithm a configuration names; shared by train and eval."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from fewshot.algorithms import MAML, Algorithm, ProtoNet
from fewshot.datasets.omniglot import load_omniglot, omniglot_split
from fewshot.datasets.sinusoid import SinusoidTasks
from fewshot.models import Conv4, SinusoidMLP
from fewshot.tasks import TaskSampler
from fewshot.training.config import TrainConfig


@dataclass
class TaskSources:
    """Samplers of meta-training, validation and meta-test episodes (disjoint classes)."""

    train: object
    val: object
    test: object


def build_sources(
    config: TrainConfig,
    data_root=None,
    download: bool = False,
    parts: tuple[str, ...] = ("train", "val", "test"),
) -> TaskSources:
    if config.dataset == "sinusoid":
        # Sinusoid tasks are continuous: "held out" means tasks never drawn in training, which
        # the separate evaluation seed guarantees in probability one.
        train = SinusoidTasks(config.shots, config.queries)
        return TaskSources(train, train, train)
    characters = load_omniglot(data_root, download=download)
    samplers = {}
    for part in parts:
        images, labels = omniglot_split(characters, config.split, part)
        train = part == "train"
        samplers[part] = TaskSampler(
            images,
            labels,
            ways=config.train_ways if train else config.ways,
            shots=config.shots,
            queries=config.train_queries if train else config.queries,
        )
    return TaskSources(samplers.get("train"), samplers.get("val"), samplers.get("test"))


def build_algorithm(config: TrainConfig) -> Algorithm:
    if config.algorithm == "protonet":
        return ProtoNet(Conv4(out_features=None, track_running_stats=True))
    if config.dataset == "sinusoid":
        model, loss = SinusoidMLP(), F.mse_loss
    else:
        model, loss = Conv4(out_features=config.ways), F.cross_entropy
    return MAML(
        model,
        inner_lr=config.inner_lr,
        inner_steps=config.inner_steps,
        eval_inner_steps=config.eval_inner_steps,
        first_order=config.first_order,
        loss=loss,
    )
