"""Features computed once: where a method's backbone is frozen whole (`freeze="backbone"`), it
is a fixed function of each image, so every image's features are computed once and training
and evaluation draw their episodes from the features instead of the images.

A backbone is a fixed function when no parameter of it learns and nothing in it depends on the
batch or the module's mode: its batch-norm layers keep frozen statistics (`FrozenBatchNorm`)
and it has no dropout, and a few images get the same features from two passes in training
mode and one in eval mode (which catches modules that draw random numbers, as drop-path
does). Then the cached features are the features, up to float rounding (the
batches differ), and the episodes drawn are the same: a sampler's draws do not depend on what
its rows hold.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from fewshot.algorithms.base import BATCH_NORM_LAYERS
from fewshot.backbones import backbones_in
from fewshot.tasks import as_float

# Modules whose output depends on the batch or on training mode: a backbone holding one is
# not a fixed function of each image.
MODE_DEPENDENT = (BATCH_NORM_LAYERS, nn.modules.dropout._DropoutNd)
IMAGES_PER_PASS = 256


def cached_backbone(algorithm: nn.Module, *samplers) -> nn.Module | None:
    """The backbone whose features can stand for the images of `samplers`, or None: every
    backbone `algorithm` holds frozen whole, fixed (see the module's doc; and two passes in
    training mode and one in eval mode of a few of the images agree, which catches a module
    that draws random numbers, such as drop-path) and holding the same weights, none skipped
    already, and every sampler one that `can_cache`."""
    backbones = list(backbones_in(algorithm))
    if not backbones or any(getattr(b, "skipped", False) for b in backbones):
        return None
    if not samplers or not all(can_cache(sampler) for sampler in samplers):
        return None
    first = backbones[0].state_dict()
    for backbone in backbones:
        if any(p.requires_grad for p in backbone.parameters()):
            return None
        if any(isinstance(m, MODE_DEPENDENT) for m in backbone.modules()):
            return None
        state = backbone.state_dict()
        if state.keys() != first.keys() or not all(torch.equal(state[k], first[k]) for k in state):
            return None
    return backbones[0] if _fixed_on(backbones[0], samplers[0]) else None


def _fixed_on(backbone: nn.Module, sampler) -> bool:
    """Whether the backbone gives a few of the sampler's images the same features twice in
    training mode and once in eval mode."""
    x = _rows(sampler, 0, 4).to(next(backbone.parameters(), torch.empty(0)).device)
    training = backbone.training
    try:
        with torch.no_grad():
            backbone.train()
            outputs = [backbone(x), backbone(x)]
            backbone.eval()
            outputs.append(backbone(x))
    finally:
        backbone.train(training)
    return all(torch.allclose(outputs[0], other) for other in outputs[1:])


def features_of(backbone: nn.Module, sampler, device: torch.device | str = "cpu") -> torch.Tensor:
    """The backbone's output for every input row of `sampler` (its images as it draws them:
    scaled to [0, 1] floats, standardised by its transform; never augmented), on the CPU."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(sampler.inputs), IMAGES_PER_PASS):
            x = _rows(sampler, start, start + IMAGES_PER_PASS)
            parts.append(backbone(x.to(device)).cpu())
    return torch.cat(parts)


def _rows(sampler, start: int, stop: int) -> torch.Tensor:
    """Rows `start:stop` of the sampler's inputs as it draws them: [0, 1] floats, standardised
    by its transform (never augmented: `can_cache`)."""
    x = as_float(sampler.inputs[start:stop])
    return x if sampler.transform is None else sampler.transform(x, None)


def on_features(sampler, backbone: nn.Module, device: torch.device | str = "cpu"):
    """A copy of `sampler` (one that `can_cache`) that draws the same episodes (or batches) of
    features instead of images."""
    cached = copy.copy(sampler)
    cached.inputs = features_of(backbone, sampler, device)
    cached.transform = None
    return cached


def can_cache(sampler) -> bool:
    """Whether `sampler` draws rows of inputs held in memory, unaugmented (not generated
    tasks, not augmented training images)."""
    transform = getattr(sampler, "transform", None)
    return hasattr(sampler, "inputs") and not getattr(transform, "augment", ())


@contextlib.contextmanager
def skipped(algorithm: nn.Module) -> Iterator[None]:
    """Within: every backbone of `algorithm` passes its input through unchanged (it is given
    the features `cached_backbone`'s backbone computed), its weights and state dict
    untouched."""
    backbones = list(backbones_in(algorithm))
    for part in backbones:
        part.forward = _identity
        setattr(part, "skipped", True)  # noqa: B010  # an nn.Module's attribute, not a field
    try:
        yield
    finally:
        for part in backbones:
            del part.forward, part.skipped


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
