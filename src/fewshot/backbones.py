"""Backbones from outside fewshot: a network built by any importable constructor, weights read
from a file, and parts of a backbone frozen for meta-training.

A constructor is named `package.module:callable` (or `path/to/file.py:callable`) and called
with the run's `backbone_args`; its output, flattened, is the embedding, and the method adds
what it needs (a head, a relation module). Naming one in a run means importing its module, and
so running its code, whenever the run is built again: loading such a run folder is refused
unless the caller trusts it (`require_trusted`). Weights files are safetensors, or state dicts
that `torch.load(weights_only=True)` reads: never pickled code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from pickle import UnpicklingError  # what torch.load(weights_only=True) refuses with
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fewshot.errors import ConfigError
from fewshot.models import FeaturesAndHead

__all__ = [
    "FREEZE_KEYWORDS",
    "BackboneNetwork",
    "FrozenBatchNorm",
    "backbones_in",
    "build_backbone_network",
    "freeze",
    "import_constructor",
    "load_backbone_weights",
    "read_weights_file",
    "start_from_weights",
]

FREEZE_KEYWORDS = {
    "backbone": "every parameter and batch-norm statistic of the backbone (the head learns)",
    "backbone-but-last": "the backbone but its last block (the last child with parameters)",
    "batch-norm": "the backbone's batch-norm statistics only (its parameters learn)",
}
"""`freeze`'s keywords and what each fixes; anything else `freeze` takes is a comma-separated
list of prefixes of the backbone's parameter names."""


def is_constructor(backbone: str | None) -> bool:
    """Whether `backbone` names a constructor (`module:callable`) rather than a built-in."""
    return backbone is not None and ":" in backbone


def import_constructor(spec: str) -> Callable[..., nn.Module]:
    """The callable that `spec` (`package.module:name` or `file.py:name`) names, its module
    imported (its code runs)."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not all(part.isidentifier() for part in attribute.split(".")):
        raise ConfigError(
            f"`backbone={spec}` is neither a built-in backbone nor a constructor named as "
            "package.module:callable (or path/to/file.py:callable)."
        )
    module = _module_from_file(spec, module_name) if module_name.endswith(".py") else None
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(
                f"`backbone={spec}`: cannot import {module_name} ({error}); install it, or put "
                "its folder on PYTHONPATH."
            ) from None
    constructor: Any = module
    for name in attribute.split("."):
        constructor = getattr(constructor, name, None)
    if not callable(constructor):
        raise ConfigError(f"`backbone={spec}`: {module_name} has no callable {attribute}.")
    return constructor


def _module_from_file(spec: str, file: str):
    """The module of a Python file, imported once per process (by its resolved path)."""
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"`backbone={spec}`: there is no file {path}.")
    name = "fewshot_backbone_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name not in sys.modules:
        loaded = importlib.util.spec_from_file_location(name, path)
        assert loaded is not None and loaded.loader is not None  # a .py file that exists
        module = importlib.util.module_from_spec(loaded)
        sys.modules[name] = module
        try:
            loaded.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def recorded_constructor(spec: str) -> str:
    """`spec` as a run records it: a file's path made absolute, so the run is built the same
    way from any folder."""
    module_name, _, attribute = spec.rpartition(":")
    if module_name.endswith(".py"):
        return f"{Path(module_name).expanduser().resolve()}:{attribute}"
    return spec


def require_trusted(backbone: str | None, trusted: bool, run_dir: Path) -> None:
    """Refuse to build a run whose backbone is a constructor unless `trusted`: building it
    imports the module the run names, which runs its code."""
    if is_constructor(backbone) and not trusted:
        assert backbone is not None
        module = backbone.rpartition(":")[0]
        raise ConfigError(
            f"{run_dir}'s backbone is built by {backbone}: loading it imports {module}, which "
            "runs its code; give `trust_backbone=True` if you trust it."
        )


class BackboneNetwork(FeaturesAndHead):
    """A network of the user's as a few-shot backbone: features(x) = flatten(backbone(x)), and
    a linear head of `out_features` outputs (none for `out_features=None`: an embedding
    network). The embedding size is read from a forward pass on `example` inputs."""

    def __init__(
        self, backbone: nn.Module, out_features: int | None, example: torch.Tensor
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(backbone, nn.Flatten())
        self.embedding_size = _output_size(self.features, example)
        self.head = nn.Linear(self.embedding_size, out_features) if out_features else nn.Identity()

    @property
    def backbone(self) -> nn.Module:
        """The user's network, what `backbone_weights` and `freeze` address."""
        return self.features[0]


def build_backbone_network(
    spec: str,
    arguments: dict[str, Any] | None,
    out_features: int | None,
    input_shape: tuple[int, ...],
) -> BackboneNetwork:
    """`BackboneNetwork` around `constructor(**arguments)`, `spec` naming the constructor, for
    inputs of `input_shape` (one example's)."""
    constructor = import_constructor(spec)
    try:
        network = constructor(**(arguments or {}))
    except TypeError as error:
        raise ConfigError(f"`backbone={spec}` with `backbone_args={arguments}`: {error}.") from None
    if not isinstance(network, nn.Module):
        raise ConfigError(f"`backbone={spec}` returned a {type(network).__name__}, not a module.")
    try:
        return BackboneNetwork(network, out_features, torch.zeros(2, *input_shape))
    except RuntimeError as error:
        shape = " x ".join(map(str, input_shape))
        first = str(error).splitlines()[0]
        raise ConfigError(
            f"`backbone={spec}` cannot take inputs of {shape} ({first}); give the input size it "
            "expects (`image_size`, `channels`) or `backbone_args` that fit the data."
        ) from None


def _output_size(features: nn.Module, example: torch.Tensor) -> int:
    """The size of `features`' output for one example, without changing it (eval mode: no
    running statistic moves)."""
    training = features.training
    features.eval()
    try:
        with torch.no_grad():
            return int(features(example).shape[1:].numel())
    finally:
        features.train(training)


def backbone_of(network: nn.Module) -> nn.Module:
    """The part of a network that `backbone_weights` and `freeze` address: a user's network
    itself, or a built-in's feature extractor (`features`)."""
    if isinstance(network, BackboneNetwork):
        return network.backbone
    if isinstance(network, FeaturesAndHead):
        return network.features
    raise ConfigError(
        f"a {type(network).__name__} has no backbone to load weights into or freeze; this method "
        "builds its own network."
    )


# The attribute that marks a network's backbone, so that it is found again in whatever a method
# builds around it (a copy, a body split from its head).
BACKBONE_MARK = "is_fewshot_backbone"


def mark_backbone(network: nn.Module) -> None:
    """Mark `network`'s backbone (`backbone_of`) where it has one, for `backbones_in`."""
    if isinstance(network, FeaturesAndHead):
        setattr(backbone_of(network), BACKBONE_MARK, True)


def backbones_in(module: nn.Module) -> Iterator[nn.Module]:
    """The backbones of the networks a method holds (its model, its encoder, a body split
    from its head), as `mark_backbone` marked them."""
    for part in module.modules():
        if getattr(part, BACKBONE_MARK, False):
            yield part


# Weights


def start_from_weights(algorithm: nn.Module, path: Path, prefix: str | None = None) -> None:
    """Load a weights file into every backbone `algorithm` holds (`backbones_in`)."""
    backbones = list(backbones_in(algorithm))
    if not backbones:
        raise ConfigError(
            f"{type(algorithm).__name__} builds its own network, with no backbone to load "
            "`backbone_weights` into; drop it."
        )
    tensors = with_prefix(read_weights_file(path), prefix)  # read once, for every copy
    for backbone in backbones:
        fit_backbone_weights(backbone, tensors, path)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a state dict saved by `torch.save` (read with
    `weights_only=True`: a file that holds code is refused); a checkpoint that nests its state
    dict under "state_dict" or "model" is unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"`backbone_weights={path}`: there is no such file.")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise ConfigError(
                f"`backbone_weights={path}` is not a safetensors file ({error})."
            ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
            raise ConfigError(
                f"`backbone_weights={path}` is neither safetensors nor a file torch.save wrote."
            ) from None
        raise ConfigError(
            f"`backbone_weights={path}` holds pickled objects besides tensors, which are never "
            "loaded (they can run code); save its `state_dict()`, or as safetensors."
        ) from None
    except Exception as error:  # not a file torch.save wrote
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"`backbone_weights={path}` is neither safetensors nor a state dict that loads with "
            f"weights_only=True ({first})."
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ConfigError(f"`backbone_weights={path}` holds no state dict of named tensors.")
    return loaded


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    """The file's tensors named as the backbone names them: `prefix` stripped from the keys
    that start with it (the others left out), or with "+prefix" added to every key."""
    if not prefix:
        return tensors
    if prefix.startswith("+"):
        return {prefix[1:] + k: v for k, v in tensors.items()}
    kept = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not kept:
        raise ConfigError(
            f"no key of the weights file starts with `weights_prefix={prefix}`; its keys start "
            f"{_listed(sorted(tensors))}."
        )
    return kept


def load_backbone_weights(backbone: nn.Module, path: Path, prefix: str | None = None) -> None:
    """Load a weights file into `backbone`: every key must match one of its tensors, in name
    and shape, or nothing is loaded and one line says what does not fit."""
    fit_backbone_weights(backbone, with_prefix(read_weights_file(path), prefix), path)


def fit_backbone_weights(backbone: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load a weights file's `tensors` (named as the backbone names them) into `backbone`, as
    `load_backbone_weights` says; `path` names the file in messages."""
    own = backbone.state_dict()
    tensors = {k: v for k, v in tensors.items() if k in own or not _not_kept(backbone, k)}
    # counters of batches seen: a file without them (older torch, other libraries) loses nothing
    missing = [k for k in own if k not in tensors and not k.endswith(BATCH_COUNTERS)]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        parts = [f"{len(missing)} missing ({_listed(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({_listed(unexpected)})"] if unexpected else []
        raise ConfigError(
            f"`backbone_weights={path}` does not fit the backbone: keys {', '.join(parts)}"
            f"{_prefix_hint(missing, unexpected)}."
        )
    tensors = {k: _per_step(backbone, k, v, own[k].shape) for k, v in tensors.items()}
    mismatched = [k for k, v in tensors.items() if v.shape != own[k].shape]
    if mismatched:
        name = mismatched[0]
        others = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise ConfigError(
            f"`backbone_weights={path}`: {name} is {tuple(tensors[name].shape)} in the file and "
            f"{tuple(own[name].shape)} in the backbone{others}."
        )
    backbone.load_state_dict(tensors, strict=False)


BATCH_NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
BATCH_COUNTERS = ("num_batches_tracked", "batches_tracked")


def _not_kept(backbone: nn.Module, key: str) -> bool:
    """Whether `key` is a running statistic of a batch-norm layer that keeps none here (a
    method that normalises by each batch's statistics: the file's have no use), or a counter
    of batches that a layer here counts otherwise (MAML++'s per-step layers)."""
    module_name, _, statistic = key.rpartition(".")
    if statistic not in BATCH_NORM_STATISTICS:
        return False
    try:
        module = backbone.get_submodule(module_name)
    except AttributeError:
        return False
    if isinstance(module, _BatchNorm):
        return module.running_mean is None
    return getattr(module, "is_batch_norm", False) and (
        statistic == "num_batches_tracked" or getattr(module, statistic, None) is None
    )


def _per_step(backbone: nn.Module, key: str, tensor: torch.Tensor, shape) -> torch.Tensor:
    """A file's batch-norm tensor for a per-step layer (MAML++'s, one row per inner step):
    its one row for every step, as `PerStepBatchNorm.replacing` starts them; any other tensor
    as it is."""
    module = backbone.get_submodule(key.rpartition(".")[0]) if "." in key else backbone
    if getattr(module, "is_batch_norm", False) and tuple(shape[1:]) == tuple(tensor.shape):
        return tensor.expand(shape).clone()
    return tensor


def _listed(keys: list[str], most: int = 4) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f", ... {len(keys) - most} more" if len(keys) > most else "")


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """ "; give `weights_prefix=P`" where the unexpected keys share a prefix that the missing
    ones lack (or the other way round), else ""."""
    if not missing or not unexpected:
        return ""
    prefix = _module_prefix(unexpected)
    if prefix and any(k[len(prefix) :] in missing for k in unexpected):
        return f"; give `weights_prefix={prefix}` to strip their prefix"
    prefix = _module_prefix(missing)
    if prefix and any(prefix + k in missing for k in unexpected):
        return f"; give `weights_prefix=+{prefix}` to add the prefix"
    return ""


def _module_prefix(keys: list[str]) -> str:
    """The keys' common prefix, cut after its last dot ("module." of "module.0.weight", ...)."""
    common = os.path.commonprefix(keys)
    return common[: common.rfind(".") + 1]


# Freezing


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics, in training as in evaluation:

        y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,

    `weight` and `bias` learned or not (`learn_affine`). The state dict keeps the names of
    the `BatchNorm` it replaces."""

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, norm: _BatchNorm, learn_affine: bool) -> None:
        super().__init__()
        assert norm.running_mean is not None and norm.running_var is not None
        assert norm.num_batches_tracked is not None  # a norm that keeps statistics
        self.eps = norm.eps
        self.register_buffer("running_mean", norm.running_mean.detach().clone())
        self.register_buffer("running_var", norm.running_var.detach().clone())
        self.register_buffer("num_batches_tracked", norm.num_batches_tracked.detach().clone())
        self.weight = self.bias = None
        if norm.affine:
            self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=learn_affine)
            self.bias = nn.Parameter(norm.bias.detach().clone(), requires_grad=learn_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x normalised with the fixed statistics, in any mode."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def freeze(network: nn.Module, spec: str) -> None:
    """Fix the part of `network`'s backbone that `spec` names (`FREEZE_KEYWORDS`, or
    comma-separated prefixes of its parameter names): its parameters stop requiring gradients
    and its batch-norm layers keep their statistics (`FrozenBatchNorm`)."""
    backbone = backbone_of(network)
    if spec == "batch-norm":
        norms = [n for n, m in backbone.named_modules() if isinstance(m, _BatchNorm)]
        if not norms or any(backbone.get_submodule(n).running_mean is None for n in norms):
            raise ConfigError(
                "`freeze=batch-norm`: the backbone's batch norm keeps no running statistics to "
                "freeze (it normalises every batch by its own)."
            )
        _replace_norms(backbone, norms, learn_affine=True)
        return
    prefixes = _frozen_prefixes(backbone, spec)
    for name, parameter in backbone.named_parameters():
        if any(_under(name, prefix) for prefix in prefixes):
            parameter.requires_grad_(False)
    norms = [
        n
        for n, m in backbone.named_modules()
        if isinstance(m, _BatchNorm)
        and m.running_mean is not None
        and any(_under(n + ".", prefix) for prefix in prefixes)
    ]
    _replace_norms(backbone, norms, learn_affine=False)


def _frozen_prefixes(backbone: nn.Module, spec: str) -> list[str]:
    if spec == "backbone":
        return [""]
    children = [n for n, m in backbone.named_children() if any(True for _ in m.parameters())]
    if spec == "backbone-but-last":
        if len(children) < 2:
            raise ConfigError(
                "`freeze=backbone-but-last`: the backbone has no blocks to tell its last from."
            )
        return [f"{n}." for n in children[:-1]]
    prefixes = [p.strip() for p in spec.split(",") if p.strip()]
    names = [n for n, _ in backbone.named_parameters()]
    unmatched = [p for p in prefixes if not any(_under(n, p) for n in names)]
    if unmatched or not prefixes:
        keywords = ", ".join(FREEZE_KEYWORDS)
        raise ConfigError(
            f"`freeze={spec}`: {', '.join(unmatched) or 'nothing'} names no parameter of the "
            f"backbone, whose parameters start {_listed(children, 6)}; give prefixes of their "
            f"names or one of {keywords}."
        )
    return prefixes


def _under(name: str, prefix: str) -> bool:
    """Whether the parameter (or module, with a trailing dot) `name` lies under `prefix`: a
    prefix ending in a dot is a module's, any other is matched whole or as a module."""
    return (
        name.startswith(prefix)
        if prefix.endswith(".") or not prefix
        else (name == prefix or name.startswith(prefix + "."))
    )


def _replace_norms(backbone: nn.Module, names: list[str], learn_affine: bool) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        norm = backbone.get_submodule(name)
        assert isinstance(norm, _BatchNorm)
        setattr(parent, child, FrozenBatchNorm(norm, learn_affine))
