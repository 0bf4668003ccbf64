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
import io
import json
import math
from collections.abc import Iterator
from types import SimpleNamespace
from unittest import mock

import torch

from fewshot.models import CONV4_WIDTHS
from fewshot.tasks import Task
from fewshot.training.config import TrainConfig

from .base import Reference
from .glue import checkout, class_major, fewshot_order, import_checkout
from .glue import quiet as quiet_about

REPOSITORY = "https://github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch"
COMMIT = "86964701651c06e490271365fedb8789a72ef3f0"
NAME = "HowToTrainYourMAMLPytorch"
TEMPLATE = "experiment_template_config/omniglot_maml++.json"
MODULES = ("meta_neural_network_architectures", "inner_loop_optimizers", "few_shot_learning_system")
QUIET = (
    "The epoch parameter in `scheduler.step()`",
    "To get the last learning rate computed by the scheduler",
    "Detected call of `lr_scheduler.step()` before `optimizer.step()`",
    "The .grad attribute of a Tensor that is not a leaf Tensor",  # their zero_grad's check
)


_loaded: dict[str, SimpleNamespace] = {}


def load() -> SimpleNamespace:
    """Their MAMLFewShotClassifier and their Omniglot MAML++ template, from the checkout."""
    if NAME not in _loaded:
        root = checkout(NAME)
        modules = import_checkout(root, COMMIT, MODULES, messages=QUIET)
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


def quiet():
    """Their warnings silenced (`QUIET`)."""
    return quiet_about(QUIET)


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
