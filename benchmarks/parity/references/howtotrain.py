"""MAML++ as Antoniou et al.'s own code runs it (HowToTrainYourMAMLPytorch,
https://github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch at `COMMIT`): their
`few_shot_learning_system.MAMLFewShotClassifier` with their `VGGReLUNormNetwork` and
`LSLRGradientDescentLearningRule`, trained by their `run_train_iter` and evaluated by their
`run_validation_iter`.

Their code is imported from a checkout outside this repository, made by
`benchmarks/parity/fetch_references.sh` in `$FEWSHOT_REFERENCES/HowToTrainYourMAMLPytorch`
(default `~/.cache/fewshot-references`); none of it is copied here. The glue only moves data
and chooses their arguments:

- their arguments are `experiment_template_config/omniglot_maml++.json` (the configuration of
  their released `omniglot_maml++-omniglot_1_8_0.1_64_5_*` runs) with fewshot's episode shape,
  steps, meta-batch, learning rates and switches put in (`their_arguments`). The schedules
  count fewshot's epochs: `total_iter_per_epoch` is fewshot's `iterations_per_epoch`,
  `multi_step_loss_num_epochs` its `msl_epochs`, `first_order_to_second_order_epoch` is
  `da_epochs - 1` (they train second order from the epoch after it; fewshot from epoch
  `da_epochs`), and `total_epochs`, the cosine's length, covers fewshot's iterations;
- `train_step` passes their ExperimentBuilder's epoch, iterations done / iterations per epoch,
  so MSL and DA change at the same iterations as fewshot's;
- a fewshot `Task` meta-batch becomes their data batch (`their_batch`): x_support (tasks, ways,
  shots, C, H, W), x_target (tasks, ways, queries, C, H, W) and float labels (tasks, ways, n)
  holding each row's class, as their data loader makes it; their per-task predictions
  (ways * queries, ways), class-major, go back to fewshot's query order (`fewshot_order`);
- their code moves everything to CUDA when `torch.cuda.is_available()`, and repeats the weights
  once per GPU when there are several: while it runs (`cpu_only`), CUDA reads as absent, so it
  runs on the CPU exactly as on a machine without a GPU. Their prints and deprecation warnings
  are silenced. Nothing they compute is changed.

Their network normalises with batch statistics always (`F.batch_norm(training=True)`), so each
query set is normalised as one batch: the reference is transductive, as fewshot's default.
Their per-step running statistics are collected but never read; evaluation means to put them
back after each task, but its backup (`copy(self.running_mean.data)`) shares their storage, so
predicting leaves them changed (tested), and nothing else.

Where it differs from fewshot's MAML++ and no setting equalises it: their network (leaky ReLU
after each batch norm, Xavier-uniform weights and zero biases; fewshot's Conv4 has ReLU and
PyTorch's default initialisation), and their cosine annealing, stepped once an epoch (fewshot
steps it every iteration).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from unittest import mock

import torch

from fewshot.models import CONV4_WIDTHS
from fewshot.tasks import Task
from fewshot.training.config import TrainConfig

from .base import Reference

REPOSITORY = "https://github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch"
COMMIT = "86964701651c06e490271365fedb8789a72ef3f0"
NAME = "HowToTrainYourMAMLPytorch"
FETCH_SCRIPT = "benchmarks/parity/fetch_references.sh"
TEMPLATE = "experiment_template_config/omniglot_maml++.json"
MODULES = ("meta_neural_network_architectures", "inner_loop_optimizers", "few_shot_learning_system")
QUIET = (
    "The epoch parameter in `scheduler.step()`",
    "To get the last learning rate computed by the scheduler",
    "Detected call of `lr_scheduler.step()` before `optimizer.step()`",
    "The .grad attribute of a Tensor that is not a leaf Tensor",  # their zero_grad's check
)


def checkout(name: str = NAME) -> Path:
    """Where fetch_references.sh puts a reference's code."""
    root = os.environ.get("FEWSHOT_REFERENCES") or Path.home() / ".cache" / "fewshot-references"
    return Path(root) / name


def import_checkout(root: Path, commit: str, names: tuple[str, ...], stubs=()) -> dict:
    """Their top-level modules `names`, imported from the checkout `root` (at `commit`), on a
    clean slate: modules of the same names imported before (another reference's `utils`) are
    set aside while theirs import, and put back after, so references do not shadow each other.
    `stubs`: names to stand in for modules they import but never use here."""
    if not (root / f"{names[0]}.py").is_file():
        raise ImportError(f"{root.name} is not checked out in {root}: run {FETCH_SCRIPT}")
    head = root / ".git" / "HEAD"
    at = head.read_text().strip() if head.is_file() else commit
    if len(at) == 40 and at != commit:
        raise ImportError(f"{root} is at commit {at}, not {commit}: run {FETCH_SCRIPT}")
    own = {path.stem for path in root.glob("*.py")} | set(stubs)
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in own}
    sys.path.insert(0, str(root))
    try:
        for name in stubs:
            sys.modules[name] = stub_module(name)
        with quiet():
            modules = {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] in own]:
            del sys.modules[name]
        sys.modules.update(saved)
    for name, module in modules.items():
        if not Path(module.__file__).resolve().is_relative_to(root.resolve()):
            raise ImportError(f"{name} comes from {module.__file__}, not from {root}")
    return modules


def stub_module(name: str) -> ModuleType:
    """An empty module `name` whose every attribute is a function that raises if called."""

    def unavailable(attribute: str):
        def function(*args, **kwargs):
            raise RuntimeError(f"{name}.{attribute} is not available to the parity harness")

        return function

    module = ModuleType(name)
    module.__getattr__ = unavailable
    return module


_loaded: dict[str, SimpleNamespace] = {}


def load() -> SimpleNamespace:
    """Their MAMLFewShotClassifier and their Omniglot MAML++ template, from the checkout."""
    if NAME not in _loaded:
        root = checkout()
        modules = import_checkout(root, COMMIT, MODULES)
        template = json.loads(substitute_placeholders((root / TEMPLATE).read_text()))
        _loaded[NAME] = SimpleNamespace(
            MAMLFewShotClassifier=modules["few_shot_learning_system"].MAMLFewShotClassifier,
            template=template,
        )
    return _loaded[NAME]


def substitute_placeholders(text: str) -> str:
    """The template's `$name$` placeholders (filled by their script_generation_tools) as JSON
    nulls: `their_arguments` sets every one of them."""
    parts = text.split("$")
    return "".join(part if i % 2 == 0 else "null" for i, part in enumerate(parts))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=re.escape(message))
        yield


@contextlib.contextmanager
def cpu_only() -> Iterator[None]:
    """While their code runs, CUDA reads as absent (`torch.cuda.is_available()` False,
    `device_count()` 0), as on a machine without a GPU; their prints go nowhere."""
    with (
        mock.patch.object(torch.cuda, "is_available", lambda: False),
        mock.patch.object(torch.cuda, "device_count", lambda: 0),
        contextlib.redirect_stdout(io.StringIO()),
        quiet(),
    ):
        yield


def their_arguments(config: TrainConfig, template: dict) -> SimpleNamespace:
    """Their args: the Omniglot MAML++ template with fewshot's resolved settings put in."""
    s = config.settings
    if s.eval_inner_steps != s.inner_steps:
        raise ValueError(
            "their evaluation reads the query predictions after number_of_training_steps_per_iter "
            f"steps only: eval_inner_steps ({s.eval_inner_steps}) must equal inner_steps "
            f"({s.inner_steps})"
        )
    if s.bnwb != s.bnrs:
        raise ValueError(
            "their per_step_bn_statistics makes both the batch-norm weights and the running "
            "statistics per step: --bnwb and --bnrs must be both on or both off"
        )
    if s.checkpoint_inner:
        raise ValueError("their code has no checkpointed inner loop: no --checkpoint-inner")
    if s.batch_norm not in (None, "transductive"):
        raise ValueError("their network normalises every batch with its own statistics only")
    backbone = config.backbone or "conv4"
    if backbone not in CONV4_WIDTHS:
        raise ValueError(f"their network is a Conv4 (VGGReLUNormNetwork), not {backbone!r}")
    args = dict(template)
    args.update(
        # the template's placeholders as their generate_configs.py fills them for Omniglot,
        # the filters as fewshot's Conv4
        conv_padding=True,
        cnn_num_filters=CONV4_WIDTHS[backbone],
        # their parser's defaults that the template leaves out, and the device (glue: CPU)
        seed=config.seed,
        use_cuda=False,
        num_of_gpus=0,
        # the episode shape and the steps
        batch_size=config.meta_batch,
        image_channels=config.channels,
        image_height=config.image_size,
        image_width=config.image_size,
        num_classes_per_set=config.train_ways,
        num_samples_per_class=config.shots,
        num_target_samples=config.train_queries,
        number_of_training_steps_per_iter=s.inner_steps,
        number_of_evaluation_steps_per_iter=s.eval_inner_steps,
        # the learning rates (their code reads task_learning_rate, not the template's
        # init_inner_loop_learning_rate; both are set)
        task_learning_rate=s.inner_lr,
        init_inner_loop_learning_rate=s.inner_lr,
        meta_learning_rate=config.outer_lr,
        min_learning_rate=s.min_outer_lr if s.ca else config.outer_lr,
        # the switches and their schedules, in fewshot's epochs
        use_multi_step_loss_optimization=bool(s.msl),
        multi_step_loss_num_epochs=s.msl_epochs,
        second_order=not s.first_order,
        first_order_to_second_order_epoch=s.da_epochs - 1 if s.da else -1,
        per_step_bn_statistics=bool(s.bnrs),
        learnable_bn_gamma=True,
        learnable_bn_beta=True,
        learnable_per_layer_per_step_inner_loop_learning_rate=bool(s.lslr),
        total_iter_per_epoch=s.iterations_per_epoch,
        total_epochs=max(1, math.ceil(config.iterations / s.iterations_per_epoch)),
        total_epochs_before_pause=max(1, math.ceil(config.iterations / s.iterations_per_epoch)),
        experiment_name="fewshot-parity",
    )
    return SimpleNamespace(**args)


def class_major(
    support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One task class-major: support (ways, shots, ...), queries (ways, queries, ...), row c
    holding class c's examples in the order given; and the order of fewshot's queries in
    theirs (their query i, counted class-major, is fewshot's query `order[i]`)."""
    ways = int(support_y.max()) + 1
    shots = torch.bincount(support_y, minlength=ways)
    queries = torch.bincount(query_y, minlength=ways)
    if int(support_y.min()) < 0 or (shots == 0).any():
        raise ValueError(f"support labels must cover 0..{ways - 1}, got {support_y.tolist()}")
    if len(queries) != ways or int(query_y.min()) < 0:
        raise ValueError(f"query labels must lie in 0..{ways - 1}, got {query_y.tolist()}")
    if (shots != shots[0]).any() or (queries != queries[0]).any():
        raise ValueError(
            f"their layout needs as many support examples ({shots.tolist()}) and as many "
            f"queries ({queries.tolist()}) in every class"
        )
    support_order = torch.argsort(support_y, stable=True)
    query_order = torch.argsort(query_y, stable=True)
    support = support_x[support_order].reshape(ways, int(shots[0]), *support_x.shape[1:])
    query = query_x[query_order].reshape(ways, int(queries[0]), *query_x.shape[1:])
    return support, query, query_order


def fewshot_order(scores: torch.Tensor, query_order: torch.Tensor) -> torch.Tensor:
    """Their per-query rows (class-major) back in fewshot's query order."""
    out = torch.empty_like(scores)
    out[query_order] = scores
    return out


def their_batch(tasks: Task) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """A fewshot meta-batch as their data batch (x_support, x_target, y_support, y_target):
    x (tasks, ways, n, C, H, W), y (tasks, ways, n) float32 class indices (their loader's
    labels); and per task the order of fewshot's queries in theirs."""
    parts = [class_major(*tasks[i].tensors()) for i in range(len(tasks))]
    x_support = torch.stack([support for support, _, _ in parts])
    x_target = torch.stack([query for _, query, _ in parts])
    b, ways, shots = x_support.shape[:3]
    queries = x_target.shape[2]
    labels = torch.arange(ways, dtype=torch.float32).view(1, ways, 1)
    y_support = labels.expand(b, ways, shots).contiguous()
    y_target = labels.expand(b, ways, queries).contiguous()
    return (x_support, x_target, y_support, y_target), [order for _, _, order in parts]


class HowToTrainReference(Reference):
    """MAML++ as their MAMLFewShotClassifier trains and evaluates it."""

    is_transductive = True  # batch statistics of each query set (module docstring)

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        their = load()
        self.args = their_arguments(config, their.template)
        self.source = (
            f"{REPOSITORY} at {COMMIT[:7]}, few_shot_learning_system.py (MAMLFewShotClassifier, "
            f"{TEMPLATE})"
        )
        self.eval_inner_steps = self.args.number_of_evaluation_steps_per_iter
        im_shape = (2, self.args.image_channels, self.args.image_height, self.args.image_width)
        with cpu_only():  # train_maml_system.py's construction, on the CPU
            self.system = their.MAMLFewShotClassifier(
                im_shape=im_shape, device=torch.device("cpu"), args=self.args
            )
        self.register_buffer("iterations_done", torch.zeros((), dtype=torch.long))

    def epoch(self) -> float:
        """Their ExperimentBuilder's epoch_idx: iterations done / iterations per epoch."""
        return int(self.iterations_done) / self.args.total_iter_per_epoch

    def train_step(self, tasks: Task) -> float:
        """One of their training iterations: `run_train_iter(data_batch, epoch)`."""
        batch, _ = their_batch(tasks)
        with cpu_only():
            losses, _ = self.system.run_train_iter(data_batch=batch, epoch=self.epoch())
        self.iterations_done += 1
        return float(losses["loss"].detach())

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        """Their `run_validation_iter` on the tasks: the query logits after their inner loop."""
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        if steps != self.args.number_of_training_steps_per_iter:
            raise ValueError(
                f"their evaluation adapts for number_of_training_steps_per_iter "
                f"({self.args.number_of_training_steps_per_iter}) steps only, got {steps}"
            )
        batch, orders = their_batch(tasks)
        was_training = self.training
        try:
            with cpu_only(), torch.enable_grad():  # their inner loop takes gradients
                _, predictions = self.system.run_validation_iter(data_batch=batch)
        finally:
            self.train(was_training)
        return torch.stack(
            [
                fewshot_order(torch.from_numpy(p), order)
                for p, order in zip(predictions, orders, strict=True)
            ]
        )


def build(method: str, config: TrainConfig) -> HowToTrainReference:
    """Their MAML++ for fewshot's resolved `config` (method "maml++")."""
    if method != "maml++":
        raise KeyError(f"HowToTrainYourMAMLPytorch reference: unknown method {method!r}")
    return HowToTrainReference(config)
