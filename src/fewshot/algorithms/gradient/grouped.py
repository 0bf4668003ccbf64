"""Tasks as groups: a convolutional network of standard layers run on every task at once, each
task's channels one group of a single wide layer.

Task t's image batch x_t (n, C, H, W) and the tasks' weights W_t become one batch
(n, T C, H, W) and one grouped convolution (T groups, weights stacked to (T C_out, C_in, k, k)),
so that conv(x, W)_t = conv(x_t, W_t) exactly; batch norm over the stacked channels normalises
each task's channels over that task's images alone (its statistics per task, as each task's own
pass computes them); ReLU and max-pooling act per channel. After `nn.Flatten` each task's
features (T, n, F) meet its own linear layer in one batched product.

This is what `torch.func.vmap` does for a convolution, but vmap moves the task dimension out
of the channels and back for every other layer (a copy of each activation, forward and
backward), and applies batch norm's and the convolution's affine parts as passes of their own.
Here the tasks stay in the channels throughout, in the channels-last layout, in which a CPU
convolves and pools fastest (but for a pass differentiated twice: `differentiated_twice`), and
the fused kernels apply the affine parts: the same computation, rounded differently
(docs/performance.md has the times and what the rounding did to the zoo's figures). It runs a
network made only of the layers below (Conv4, for instance) whose batch norm updates no running
statistics; any other network runs under vmap (`runs_grouped`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.rules import Params
from fewshot.models import FeaturesAndHead

_TWICE: ContextVar[bool] = ContextVar("fewshot_differentiated_twice", default=False)
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Identity)
_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.Flatten, nn.Linear, *_ELEMENTWISE)


def runs_grouped(module: nn.Module, x: torch.Tensor | tuple) -> bool:
    """Whether `module` on a batch of tasks' images `x` (tasks, n, C, H, W) runs as groups: a
    network of `nn.Sequential`s (and `FeaturesAndHead`) over the layers above, convolutions,
    batch norm and pooling before one `nn.Flatten` and linear layers after it, no hooks, and
    no batch norm that would update running statistics."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or _global_hooks():
        return False
    layers = _layers_in_order(module)
    if layers is None or not all(map(_groupable, layers)):
        return False
    flattens = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Flatten)]
    end = flattens[0] if flattens else len(layers)
    before, after = layers[:end], layers[end + 1 :]
    return (
        len(flattens) <= 1
        and any(isinstance(layer, nn.Conv2d) for layer in before)
        and not any(isinstance(layer, nn.Linear) for layer in before)
        and all(isinstance(layer, (nn.Linear, *_ELEMENTWISE)) for layer in after)
    )


def _layers_in_order(module: nn.Module) -> list[nn.Module] | None:
    """The layers `module` runs, in order; None if a container other than `nn.Sequential` or
    `FeaturesAndHead` (whose order its own forward decides) or a hook is in the way."""
    if _hooked_or_replaced(module):
        return None
    if type(module) is nn.Sequential:
        children = list(module.children())
    elif isinstance(module, FeaturesAndHead) and type(module).forward is FeaturesAndHead.forward:
        children = [module.features, module.head]
    else:
        return [module]
    layers: list[nn.Module] = []
    for child in children:
        inner = _layers_in_order(child)
        if inner is None:
            return None
        layers += inner
    return layers


def _hooked_or_replaced(module: nn.Module) -> bool:
    """A forward hook on `module`, or a `forward` of its own (set on the instance), which the
    grouped layers would not run."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in vars(module)


def _global_hooks() -> bool:
    """Forward hooks registered for every module (`register_module_forward_hook`)."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _groupable(layer: nn.Module) -> bool:
    if type(layer) not in _LAYERS or _hooked_or_replaced(layer):
        return False
    if isinstance(layer, nn.Conv2d):
        return layer.padding_mode == "zeros" and isinstance(layer.padding, tuple)
    if isinstance(layer, nn.BatchNorm2d):  # batch statistics, or running ones left as they are
        return not (layer.training and layer.track_running_stats)
    if isinstance(layer, nn.MaxPool2d):
        return not layer.return_indices
    if isinstance(layer, nn.Flatten):
        return (layer.start_dim, layer.end_dim) == (1, -1)
    return True


@contextlib.contextmanager
def differentiated_twice(twice: bool = True) -> Iterator[None]:
    """Within (with `twice`), the forward passes are ones whose graph will be differentiated
    twice: a second-order inner step's support pass (and its recomputation under
    `checkpoint_inner`, so that both round alike). Their grouped networks run in torch's
    default layout, whose convolutions a CPU differentiates twice faster than channels-last
    ones (docs/performance.md); every other pass runs channels-last."""
    token = _TWICE.set(twice)
    try:
        yield
    finally:
        _TWICE.reset(token)


def layout() -> torch.memory_format:
    """The memory format of the grouped networks' images in the present pass."""
    return torch.contiguous_format if _TWICE.get() else torch.channels_last


def on_every_task(module: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """`module` on each task's inputs x[t] with task t's parameters params[name][t] (every
    parameter with a leading task dimension): the result vmap gives, (tasks, n, ...)."""
    tasks, n = x.shape[:2]
    images = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])  # (n, tasks C, H, W)
    out = _run(module, "", params, images.contiguous(memory_format=layout()), tasks)
    if out.dim() == 4:  # still images: (n, tasks C, H, W) back to (tasks, n, C, H, W)
        return out.reshape(n, tasks, -1, *out.shape[2:]).transpose(0, 1)
    return out


def _run(module: nn.Module, prefix: str, params: Params, h: torch.Tensor, tasks: int):
    """`module` (named `prefix` in the network) on h: images (n, tasks C, H, W) before
    `nn.Flatten`, features (tasks, n, F) after it."""
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            h = _run(child, f"{prefix}{name}.", params, h, tasks)
        return h
    if isinstance(module, FeaturesAndHead):
        h = _run(module.features, f"{prefix}features.", params, h, tasks)
        return _run(module.head, f"{prefix}head.", params, h, tasks)

    def stacked(name: str) -> torch.Tensor | None:
        """Parameter `name` of every task, the tasks' rows one after another (None if absent)."""
        value = params.get(prefix + name)
        return None if value is None else value.flatten(0, 1)

    if isinstance(module, nn.Conv2d):
        weight = cast(torch.Tensor, stacked("weight"))
        return F.conv2d(
            h,
            weight,
            stacked("bias"),
            module.stride,
            cast(tuple[int, ...], module.padding),
            module.dilation,
            module.groups * tasks,
        )
    if isinstance(module, nn.BatchNorm2d):
        # Batch statistics (the running ones, if any, left as they are: `_groupable`), or the
        # running statistics, the same for every task; as `nn.BatchNorm2d` decides.
        batch = module.training or module.running_mean is None
        mean = var = None
        if not batch:
            mean = cast(torch.Tensor, module.running_mean).repeat(tasks)
            var = cast(torch.Tensor, module.running_var).repeat(tasks)
        return F.batch_norm(
            h, mean, var, stacked("weight"), stacked("bias"), batch, 0.0, module.eps
        )
    if isinstance(module, nn.MaxPool2d):
        return F.max_pool2d(
            h, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode
        )
    if isinstance(module, nn.Flatten):  # (n, tasks C, H, W) -> (tasks, n, C H W)
        return h.reshape(h.shape[0], tasks, -1).transpose(0, 1)
    if isinstance(module, nn.Linear):
        weight = cast(torch.Tensor, params.get(prefix + "weight"))
        bias = params.get(prefix + "bias")
        out = torch.bmm(h, weight.transpose(1, 2))
        return out if bias is None else out + bias.unsqueeze(1)
    if isinstance(module, nn.LeakyReLU):
        return F.leaky_relu(h, module.negative_slope)
    if isinstance(module, nn.ReLU):
        return F.relu(h)
    return h  # nn.Identity
