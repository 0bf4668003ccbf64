"""ProtoNet, Matching Networks, Relation Networks, Baseline and Baseline++ as Chen et al. 2019's
code runs them (CloserLookFewShot, https://github.com/wyharveychen/CloserLookFewShot at
`COMMIT`), with their classes and their Omniglot backbones.

Their code is imported from a checkout outside this repository, made by
`benchmarks/parity/fetch_references.sh` in `$FEWSHOT_REFERENCES/CloserLookFewShot` (default
`~/.cache/fewshot-references`); none of it is copied here. The glue only moves data:

- a fewshot `Task` becomes their episode layout, x of shape (n_way, n_support + n_query, C, H,
  W), class c's support examples then its queries in row c (`episode_layout`), and their scores
  (n_way * n_query, n_way), class-major, go back to fewshot's query order (`fewshot_order`);
- their code calls `.cuda()` everywhere: while it runs (`their_device`), `torch.Tensor.cuda` and
  `nn.Module.cuda` move to the device the reference's weights are on (the identity on the CPU),
  and the deprecation warnings their 2019 code triggers are silenced. Nothing they compute is
  changed.

Training is their train.py: Adam at its default rate 1e-3 over all the model's parameters, one
episode per update (`set_forward_loss`, backward, step) in train mode; Baseline and Baseline++
pretrain `BaselineTrain` (linear or `distLinear` head over all training classes) on ordinary
batches (`forward_loss`). Prediction is their test.py: the features are the backbone's in eval
mode (save_features.py calls `model.eval()`, running batch-norm statistics), then the method's
`set_forward(z, is_feature=True)` on them; Baseline and Baseline++ fit a new head on each
support set with their `BaselineFinetune` (100 epochs of SGD in batches of 4). test.py never
puts the method itself in eval mode, so Relation Networks' relation module normalises with the
batch statistics of the episode's (query, class) pairs, as their final test does (their
train.py's validation calls `model.eval()` and uses the running ones instead): that reference
is transductive. Its running statistics are put back after each prediction, so predicting
changes no state.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from fewshot.tasks import Batch, Task
from fewshot.training.config import TrainConfig

from .base import Reference
from .glue import FETCH_SCRIPT, class_major, fewshot_order
from .glue import checkout as checkout_of
from .glue import quiet as quiet_about

REPOSITORY = "https://github.com/wyharveychen/CloserLookFewShot"
COMMIT = "e03aca8a2d01c9b5861a5a816cd5d3fdfc47cd45"
ADAM_LR = 1e-3  # train.py: torch.optim.Adam(model.parameters()), PyTorch's default rate
IMAGE_SIZE = 28  # their Omniglot size: Conv4S's 64 features and Conv4SNP's 64x5x5 maps need it

# method -> (their class, the file it is in, their backbone)
FILES = {
    "protonet": ("ProtoNet", "methods/protonet.py", "Conv4S"),
    "matchingnet": ("MatchingNet", "methods/matchingnet.py", "Conv4S"),
    "relationnet": ("RelationNet", "methods/relationnet.py", "Conv4SNP"),
    "baseline": (
        "BaselineTrain('softmax') + BaselineFinetune",
        "methods/baselinetrain.py, methods/baselinefinetune.py",
        "Conv4S",
    ),
    "baseline++": (
        "BaselineTrain('dist') + BaselineFinetune",
        "methods/baselinetrain.py, methods/baselinefinetune.py",
        "Conv4S",
    ),
}
EPISODIC = ("protonet", "matchingnet", "relationnet")
LOSS_TYPES = {"baseline": "softmax", "baseline++": "dist"}  # their train.py / test.py

# The warnings their PyTorch-0.4 code triggers on a current PyTorch (nn.Softmax() without dim,
# F.sigmoid, WeightNorm): the behaviour they name is the one their code was written for.
QUIET = (
    "Implicit dimension choice for softmax",
    "nn.functional.sigmoid is deprecated",
    "`torch.nn.utils.weight_norm` is deprecated",
)


def checkout() -> Path:
    """Where fetch_references.sh puts their code."""
    return checkout_of("CloserLookFewShot")


def load() -> SimpleNamespace:
    """Their modules `backbone`, `methods.*` and `utils`, imported from the checkout."""
    root = checkout()
    if not (root / "methods" / "protonet.py").is_file():
        raise ImportError(
            f"CloserLookFewShot is not checked out in {root}: run {FETCH_SCRIPT} "
            f"(FEWSHOT_REFERENCES sets the folder)"
        )
    head = root / ".git" / "HEAD"
    at = head.read_text().strip() if head.is_file() else COMMIT
    if len(at) == 40 and at != COMMIT:  # a detached checkout at another commit
        raise ImportError(f"{root} is at commit {at}, not {COMMIT}: run {FETCH_SCRIPT}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    with quiet():
        import backbone
        import methods.baselinefinetune
        import methods.baselinetrain
        import methods.matchingnet
        import methods.protonet
        import methods.relationnet
        import utils
    for module in (backbone, utils, methods.protonet):
        if not Path(module.__file__).resolve().is_relative_to(root.resolve()):
            raise ImportError(
                f"{module.__name__} comes from {module.__file__}, not from {root}: another "
                f"module of that name shadows CloserLookFewShot's"
            )
    return SimpleNamespace(
        backbone=backbone,
        ProtoNet=methods.protonet.ProtoNet,
        MatchingNet=methods.matchingnet.MatchingNet,
        RelationNet=methods.relationnet.RelationNet,
        BaselineTrain=methods.baselinetrain.BaselineTrain,
        BaselineFinetune=methods.baselinefinetune.BaselineFinetune,
    )


def quiet():
    """Their warnings silenced (`QUIET`)."""
    return quiet_about(QUIET)


@contextlib.contextmanager
def their_device(device: torch.device) -> Iterator[None]:
    """While their code runs: `.cuda()` of tensors and modules moves them to `device` (their
    code calls it on every input and label); their warnings are silenced."""
    tensor_cuda, module_cuda = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor.to(device)
    nn.Module.cuda = lambda module, *args, **kwargs: module.to(device)
    try:
        with quiet():
            yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = tensor_cuda, module_cuda


def episode_layout(
    support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """One task in their layout: x (n_way, n_support + n_query, ...), row c holding class c's
    support examples then its queries (each in the order given); also n_support, and the order
    of fewshot's queries in theirs (their query row i is fewshot's query `order[i]`)."""
    support, query, query_order = class_major(support_x, support_y, query_x, query_y)
    return torch.cat((support, query), dim=1), support.shape[1], query_order


class CloserLookReference(Reference):
    """One of Chen et al.'s methods with their classes; `shots` is their n_support (n_shot),
    `ways` their train_n_way, `num_classes` BaselineTrain's (Baseline, Baseline++ only)."""

    def __init__(self, method: str, shots: int, ways: int, num_classes: int | None = None) -> None:
        super().__init__()
        if method not in FILES:
            raise KeyError(f"CloserLookFewShot reference: unknown method {method!r}")
        their = load()
        self.method = method
        name, files, network = FILES[method]
        self.source = f"{REPOSITORY} at {COMMIT[:7]}, {files} ({name}, backbone.{network})"
        self.is_transductive = method == "relationnet"  # see the module's docstring
        backbone = getattr(their.backbone, network)
        with their_device(torch.device("cpu")):
            if method == "protonet":
                self.model = their.ProtoNet(backbone, n_way=ways, n_support=shots)
            elif method == "matchingnet":
                self.model = their.MatchingNet(backbone, n_way=ways, n_support=shots)
            elif method == "relationnet":
                self.model = their.RelationNet(backbone, n_way=ways, n_support=shots)
            else:
                if num_classes is None:
                    raise ValueError(f"{method} needs the number of training classes")
                self.model = their.BaselineTrain(backbone, num_classes, LOSS_TYPES[method])
        self._finetune = their.BaselineFinetune
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=ADAM_LR)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def running(self) -> Iterator[torch.device]:
        device = self.device
        fce = getattr(self.model, "FCE", None)
        if fce is not None:  # MatchingNet's c_0 is a plain tensor attribute, moved by .cuda()
            fce.c_0 = fce.c_0.to(device)
        with their_device(device):
            yield device

    def train_step(self, tasks: Task | Batch) -> float:
        """One update of their train loop: an episode (`set_forward_loss`) or, for Baseline and
        Baseline++, a batch of examples (`forward_loss`)."""
        self.model.train()
        with self.running():
            self.optimizer.zero_grad()
            if isinstance(tasks, Batch):
                if self.method in EPISODIC:
                    raise TypeError(f"{self.method} trains on episodes, got a batch of examples")
                loss = self.model.forward_loss(tasks.x, tasks.y)
            else:
                if self.method not in EPISODIC:
                    raise TypeError(f"{self.method} trains on batches of examples, got episodes")
                if len(tasks) != 1:
                    raise ValueError(
                        f"their train.py updates on one episode at a time, got {len(tasks)}"
                    )
                x, n_support, _ = episode_layout(*tasks[0].tensors())
                self.set_shape(x, n_support)
                loss = self.model.set_forward_loss(x)
            loss.backward()
            self.optimizer.step()
        return loss.item()

    def set_shape(self, x: torch.Tensor, n_support: int, model: nn.Module | None = None) -> None:
        """What their loops set before each episode (train_loop, feature_evaluation)."""
        model = self.model if model is None else model
        model.n_way, model.n_support, model.n_query = len(x), n_support, x.shape[1] - n_support

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        """Their test.py per task: the backbone's features in eval mode, then the method on
        them (`inner_steps` is ignored: their methods have no adaptation steps to set, and
        BaselineFinetune always trains its head for 100 epochs)."""
        was_training = self.training
        self.model.eval()
        logits = []
        try:
            with self.running(), torch.no_grad(), self.numpy_seeded():
                for i in range(len(tasks)):
                    x, n_support, order = episode_layout(*tasks[i].tensors())
                    z = self.model.feature(x.flatten(0, 1)).unflatten(0, x.shape[:2])
                    logits.append(fewshot_order(self.scores(z, n_support), order))
        finally:
            self.train(was_training)
        return torch.stack(logits)

    def scores(self, z: torch.Tensor, n_support: int) -> torch.Tensor:
        """Their scores (n_way * n_query, n_way) on one episode's features z (their layout)."""
        if self.method in EPISODIC:
            self.set_shape(z, n_support)
            if self.method != "relationnet":
                return self.model.set_forward(z, is_feature=True)
            relation = self.model.relation_module  # in train mode, as in their test.py
            saved = [buffer.clone() for buffer in relation.buffers()]
            relation.train()
            try:
                return self.model.set_forward(z, is_feature=True)
            finally:
                relation.eval()
                for buffer, value in zip(relation.buffers(), saved, strict=True):
                    buffer.copy_(value)
        trained = self.model.feature
        finetune = self._finetune(lambda: trained, len(z), n_support, LOSS_TYPES[self.method])
        self.set_shape(z, n_support, finetune)
        with torch.enable_grad():  # it trains a new head; the evaluator runs under no_grad
            return finetune.set_forward(z, is_feature=True).detach()

    @contextlib.contextmanager
    def numpy_seeded(self) -> Iterator[None]:
        """BaselineFinetune draws its mini-batches with numpy's global generator: seed it from
        torch's (which fewshot's evaluator seeds), and put its state back after."""
        state = np.random.get_state()
        np.random.seed(int(torch.randint(2**31 - 1, ())))
        try:
            yield
        finally:
            np.random.set_state(state)


def build(method: str, config: TrainConfig) -> CloserLookReference:
    """The CloserLookFewShot reference of `method` for fewshot's resolved `config`: their
    Omniglot setting (28x28 images, one episode an update, Adam at 1e-3)."""
    if config.image_size != IMAGE_SIZE:
        raise ValueError(
            f"CloserLookFewShot's Omniglot backbones take {IMAGE_SIZE}x{IMAGE_SIZE} images, "
            f"got image_size {config.image_size}"
        )
    if config.outer_lr is not None and config.outer_lr != ADAM_LR:
        raise ValueError(f"their train.py uses Adam at {ADAM_LR}, got outer_lr {config.outer_lr}")
    if method in EPISODIC and config.meta_batch != 1:
        raise ValueError("their train.py updates on one episode at a time: --meta-batch 1")
    num_classes = None
    if method not in EPISODIC:
        num_classes = getattr(config.settings, "classes", None)
        if num_classes is None:
            raise ValueError(
                f"{method}: BaselineTrain needs the number of training classes "
                f"(config.settings.classes, which fewshot sets from the training data)"
            )
    torch.manual_seed(config.seed)
    return CloserLookReference(method, config.shots, config.train_ways, num_classes)
