"""The interface every meta-learning method shares: one training loop and evaluator serve all.

A method is trained on meta-batches (a `Task` whose tensors have a leading task dimension) with
`training_step`, and used with `adapt(support_x, support_y) -> Predictor`: the predictor labels
new inputs of those tasks, without their labels. `predict(tasks)` is `adapt` followed by the
predictor on the query inputs. `adapt(support)` of one `Support` (a user's labelled examples of
named classes) returns a `SupportPredictor` for inputs without a task dimension.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.errors import ConfigError
from fewshot.tasks import Support, Task

if TYPE_CHECKING:
    from fewshot.algorithms.metric import SupportFineTuning
    from fewshot.datasets.preprocessing import Preprocessing
    from fewshot.training.config import TrainConfig

# Which examples a batch-norm layer takes its statistics from when a trained method predicts:
# "transductive": the batch at hand, so the queries of an episode influence each other's
#     predictions (MAML's original protocol);
# "inductive": never from other queries (the support set, or running statistics).
BATCH_NORM_POLICIES = ("transductive", "inductive")


class Predictor:
    """Outputs for new inputs of the tasks a method was adapted to.

    Called on inputs shaped (tasks, n, ...), with the same leading task dimension as the support
    sets it was adapted on, it returns (tasks, n, outputs): logits for classification, values
    for regression.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._forward = forward

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._forward(inputs)

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities, softmax of the logits."""
        return F.softmax(self(inputs), dim=-1)


class SupportPredictor:
    """A method adapted to one `Support`: logits and probabilities over its classes for inputs
    shaped (n, ...), and the names of the predicted classes.

    A fixed head with more outputs than the support has classes is cut to its first ones (the
    support's labels), so the predictions are always among the support's classes.
    """

    def __init__(
        self,
        predictor: Predictor,
        classes: list[str],
        device: torch.device,
        chunk: int | None = None,
    ) -> None:
        """`chunk`: inputs per pass, to bound memory (inductive gradient methods pass the
        support set plus one input per input); None: all in one pass, as a transductive
        method's inputs must be to normalise each other."""
        self.predictor, self.classes, self.device, self.chunk = predictor, classes, device, chunk

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (n, classes) of inputs (n, ...), on the CPU."""
        parts = inputs.split(self.chunk) if self.chunk else [inputs]
        with torch.no_grad():
            logits = [self.predictor(p.unsqueeze(0).to(self.device))[0].cpu() for p in parts]
        return torch.cat(logits)[:, : len(self.classes)]

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.softmax(self(inputs), dim=-1)

    def predict(self, inputs: torch.Tensor) -> list[str]:
        """The name of the most probable class of each input."""
        return [self.classes[i] for i in self(inputs).argmax(-1).tolist()]


# Python's words for a keyword argument that no constructor takes, or that one passes again.
_UNEXPECTED = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")
_REPEATED = re.compile(r"(\w+)\.__init__\(\) got multiple values for keyword argument '(\w+)'")


def option_refusal(cls: type, message: str) -> str | None:
    """The one-line refusal of an option for `cls`'s constructor, where `message` is Python's
    TypeError about a keyword argument of a constructor in `cls`'s chain; else None."""
    chain = {klass.__name__ for klass in cls.__mro__}
    for pattern, words in ((_UNEXPECTED, "takes no option"), (_REPEATED, "sets the option")):
        match = pattern.search(message)
        if match and match.group(1) in chain:
            name = match.group(2)
            if pattern is _REPEATED:
                return f"{cls.__name__} {words} `{name}` itself; leave it out."
            return f"{cls.__name__} {words} `{name}`; it takes {', '.join(options_of(cls))}."
    return None


def options_of(cls: type) -> list[str]:
    """The keyword options `cls`'s constructor takes: its own named parameters, and those of
    the constructors it passes `**options` on to."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is nn.Module:
            continue
        parameters = inspect.signature(inspect.unwrap(init)).parameters.values()
        for parameter in parameters:  # those with defaults: the options, not the model
            keyword = parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
            if keyword and parameter.default is not parameter.empty:
                names.append(parameter.name)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


class Algorithm(nn.Module):
    """A meta-learning method wrapping a model.

    Subclasses implement `meta_loss` (or `training_step`, when the outer update is not the
    gradient of a loss) and `adapt_tasks`. Everything learnable is a parameter or buffer of the
    algorithm, so `parameters()` and `state_dict()` cover it. `batch_norm` is one of
    `BATCH_NORM_POLICIES`.
    """

    batch_norm: str = "transductive"
    # What `training_step` takes: "episodes" (a `Task` meta-batch, from a `TaskSampler`) or
    # "examples" (a `Batch` of examples of all training classes, from an `ExampleSampler`),
    # for methods that pretrain without episodes.
    training_data: str = "episodes"
    # Whether the method adapts by a number of steps, so that `inner_steps` changes its
    # predictions (gradient-based methods and the fine-tuning family; metric methods do not).
    adapts_by_steps: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Each method's constructor refuses an option it does not take, or one it sets
        itself, in one line (`ConfigError`) instead of Python's TypeError from deep in the
        chain of constructors that pass `**options` on."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def checked_init(self, *args: object, **options: object) -> None:
            try:
                init(self, *args, **options)
            except TypeError as error:
                outermost = type(self).__init__ is checked_init  # not one passed options on
                refusal = option_refusal(type(self), str(error)) if outermost else None
                if refusal is None:
                    raise
                raise ConfigError(refusal) from None

        cls.__init__ = checked_init  # type: ignore[method-assign]

    @classmethod
    def training_loss_label(cls, inner_steps: int | None) -> str:
        """What the "loss" of `training_step`'s metrics is, in words (plots' axes); the
        training `inner_steps` for the methods that take steps."""
        return "loss" if cls.training_data == "examples" else "query loss"

    @property
    def is_transductive(self) -> bool:
        """Whether a query's prediction can depend on the other queries of its episode."""
        return self.batch_norm == "transductive"

    def meta_loss(self, tasks: Task) -> torch.Tensor:
        """Mean query loss over the meta-batch, differentiable with respect to `parameters()`."""
        raise NotImplementedError

    def training_step(self, tasks: Task) -> dict[str, float]:
        """Accumulate the outer gradient of one meta-batch (or `Batch` of examples, for
        `training_data = "examples"`) into `.grad`; return its metrics.

        The metrics hold at least "loss"; methods add what they get cheaply ("accuracy" of the
        queries, "inner_loss" of the support sets). A non-finite loss is returned without
        back-propagating it, and the training loop stops on it.
        """
        loss = self.meta_loss(tasks)
        if torch.isfinite(loss):
            loss.backward()
        return {"loss": loss.item()}

    # The norm `clip_gradients` clips the whole outer gradient to (None: no clipping).
    gradient_clip: float | None = None

    def clip_gradients(self) -> None:
        """Clip the norm of the whole outer gradient to `gradient_clip` (nothing without one).

        The training loop's `meta_step` calls it after `training_step` (and, over several
        processes, after averaging their gradients); a loop of your own calls it before
        `optimizer.step()`.
        """
        if self.gradient_clip:
            nn.utils.clip_grad_norm_(self.parameters(), self.gradient_clip)

    # Set by `fewshot.load` from the run folder: the number of outputs of a per-class head
    # (adapting to more classes is refused with one line), how the run's training images
    # were read (a `datasets.preprocessing.Preprocessing`, None for sinusoids and tables), and
    # the run's configuration.
    max_ways: int | None = None
    preprocessing: Preprocessing | None = None
    config: TrainConfig | None = None  # the run's TrainConfig

    def adapt(
        self,
        support_x: torch.Tensor | Support,
        support_y: torch.Tensor | None = None,
        inner_steps: int | None = None,
    ) -> Predictor:
        """Adapt to support sets and return their predictor.

        Given tensors shaped (tasks, n, ...), as meta-batches are, it adapts to each task
        (`adapt_tasks`). Given one `Support` (examples of named classes, no task dimension), it
        adapts to that one task and returns a `SupportPredictor` over its classes.
        """
        if isinstance(support_x, Support):
            return self.adapt_to_support(support_x, inner_steps)
        assert support_y is not None  # support tensors come with their labels
        return self.adapt_tasks(support_x, support_y, inner_steps)

    def adapt_tasks(
        self, support_x: torch.Tensor, support_y: torch.Tensor, inner_steps: int | None = None
    ) -> Predictor:
        """Adapt to support sets shaped (tasks, n, ...), and return their predictor.

        `inner_steps` overrides the number of adaptation steps of gradient-based methods;
        other methods ignore it. For one task, add a leading dimension of 1.
        """
        raise NotImplementedError

    def adapt_to_support(self, support: Support, inner_steps: int | None = None):
        """`adapt` for one `Support`; refuses more classes than a fixed head has."""
        ways = len(support.classes)
        if self.max_ways is not None and ways > self.max_ways:
            raise ConfigError(
                f"the support set has {ways} classes but this model's head has "
                f"{self.max_ways} outputs; use at most {self.max_ways} classes."
            )
        device = next(iter(self.parameters())).device
        predictor = self.adapt_tasks(
            support.x.unsqueeze(0).to(device), support.y.unsqueeze(0).to(device), inner_steps
        )
        chunk = None if self.is_transductive else 64
        return SupportPredictor(predictor, support.classes, device, chunk)

    def set_support_fine_tuning(self, fine_tuning: SupportFineTuning | None) -> None:
        """Fine-tune on each episode's support set before predicting (`metric.
        SupportFineTuning`, P>M>F's F), or stop (None); methods that embed and compare do."""
        if fine_tuning is not None:
            raise ConfigError(
                f"{type(self).__name__} adapts its own way; `finetune_steps` fine-tunes the "
                "encoder of a metric method (one that embeds and compares)."
            )

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        """Query outputs (logits or regression values), shaped (tasks, queries, ...)."""
        with torch.no_grad():
            return self.adapt_tasks(tasks.support_x, tasks.support_y, inner_steps)(tasks.query_x)

    def configure_optimizers(
        self, lr: float, iterations: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The outer optimizer and its learning-rate schedule (None: constant); Adam by default.

        The training loop steps the schedule once per iteration and checkpoints its state.
        """
        return torch.optim.Adam(self.parameters(), lr=lr), None


def check_batch_norm_policy(policy: str | None) -> str:
    if policy not in BATCH_NORM_POLICIES:
        raise ConfigError(
            f"batch_norm must be one of {', '.join(BATCH_NORM_POLICIES)}, got {policy!r}."
        )
    return policy


BATCH_NORM_LAYERS = nn.modules.batchnorm._BatchNorm


def has_batch_norm(module: nn.Module) -> bool:
    """Whether `module` has batch-norm layers: torch's, or layers that mark themselves with
    `is_batch_norm = True` (`batchnorm.PerStepBatchNorm`)."""
    return any(
        isinstance(m, BATCH_NORM_LAYERS) or getattr(m, "is_batch_norm", False)
        for m in module.modules()
    )


@contextlib.contextmanager
def batch_norm_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Put the module's batch-norm layers, and nothing else, in training mode (batch
    statistics) or eval mode (running statistics) for the duration."""
    layers = [m for m in module.modules() if isinstance(m, BATCH_NORM_LAYERS)]
    modes = [m.training for m in layers]
    for m in layers:
        m.train(training)
    try:
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


@contextlib.contextmanager
def unchanged_buffers(module: nn.Module) -> Iterator[None]:
    """Forward passes within may update buffers (batch norm's running statistics, in training
    mode); their values before the block are put back after it."""
    saved = {name: b.clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])
