"""The network a reference trains: fewshot's own, built as fewshot's loop builds it."""

from __future__ import annotations

import random

import numpy as np
import torch

from fewshot.models import default_model
from fewshot.training.config import TrainConfig


def initial_network(config: TrainConfig, head: bool = True) -> torch.nn.Module:
    """`fewshot.models.default_model` for `config`, drawn right after seeding every generator
    from `config.seed` as fewshot's training loop does, so its initial weights are those of
    fewshot's run (the harness checks it); `head=False`: the embedding network."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    return default_model(
        config.dataset,
        config.ways if head else None,
        config.channels,
        config.image_size,
        False,
        config.features,
        config.backbone or "conv4",
    )
