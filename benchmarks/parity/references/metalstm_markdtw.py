"""Meta-LSTM (Ravi & Larochelle 2017) as markdtw's PyTorch port runs it
(https://github.com/markdtw/meta-learning-lstm-pytorch at `COMMIT`): their `learner.Learner`,
`metalearner.MetaLearner` (with its `MetaLSTMCell`) and `main.train_learner`, driven by their
main.py's meta-training step and `meta_test`, transcribed here line for line around their
calls.

Their code is imported from a checkout outside this repository, made by
`benchmarks/parity/fetch_references.sh` in `$FEWSHOT_REFERENCES/meta-learning-lstm-pytorch`
(default `~/.cache/fewshot-references`); none of it is copied here. main.py imports their
data loader (torchvision, miniImageNet folders), which the harness never uses: an empty
`dataloader` module stands in for it while main.py imports.

Settings: fewshot's Meta-LSTM Omniglot settings where their script takes them: `--epoch` is
fewshot's inner steps T (12), `--batch-size` the whole support set (fewshot's inner loop takes
no mini-batches, so one "epoch" is one update), `--lr` fewshot's outer rate, `--grad-clip` its
gradient clip, `--hidden-size` its hidden size, `--input-size` 4; one episode per update
(`--meta-batch 1`). Their batch norm's `--bn-eps 1e-3 --bn-momentum 0.95` are their scripts'
(scripts/train_5s_5c.sh). Their Learner is their own Conv4 of 32 filters whose first
convolution takes 3 channels (it is built for miniImageNet and takes no channel count): the
glue repeats Omniglot's grayscale channel three times (`three_channels`), so their network
runs as written.

The data: a fewshot `Task` becomes their episode, class-major (their main.py's
`episode_x[:, :n_shot]` and `episode_x[:, n_shot:]` with labels `np.repeat(range(n_class),
n)`), and their query outputs go back to fewshot's query order. Prediction is their
`meta_test`: the learner adapted in train mode, its batch-norm running statistics reset before
and collected over the inner loop, the queries classified in eval mode with them (no query sees
another: not transductive).

Where their code differs from fewshot's Meta-LSTM and no setting equalises it:
- train_learner feeds the meta-learner, and subtracts, the mean loss's gradient divided once
  more by the batch size (`p.grad.data / args.batch_size`): 5 times smaller for 5-way 1-shot;
- their MetaLSTMCell carries the gates before the sigmoid as f_{t-1} and i_{t-1} (fewshot and
  the paper: the gate values);
- b_I starts in U(-5, -4) (fewshot: logit(--inner-lr) +- 0.5, U(-5.09, -4.09) at 0.01); their
  preprocessing takes log(|x| + 1e-8) where fewshot takes log|x|; their first LSTM reads
  (loss, gradient), fewshot's (gradient, loss), the same under its random initialisation;
- their Learner: 3 input channels (the grayscale repeated, so the first convolution has 864
  weights, each updated by the meta-learner, where fewshot's has 288), batch norm with eps
  1e-3, and at prediction running statistics of momentum 0.95 from reset values (fewshot: eps
  1e-5, and every support pass averaged equally).
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from fewshot.tasks import Task
from fewshot.training.config import TrainConfig

from .base import Reference
from .glue import checkout, class_major, fewshot_order, import_checkout
from .glue import quiet as quiet_about
from .howtotrain import QUIET

REPOSITORY = "https://github.com/markdtw/meta-learning-lstm-pytorch"
COMMIT = "fcc68baad71a3293edeb227a1676de9e9edea9c3"
NAME = "meta-learning-lstm-pytorch"
FETCH_SCRIPT = "benchmarks/parity/fetch_references.sh"
INPUT_SIZE = 4  # their scripts' --input-size: the preprocessed loss and gradient
BN_EPS, BN_MOMENTUM = 1e-3, 0.95  # their scripts' --bn-eps, --bn-momentum
CHANNELS = 3  # their Learner's first convolution: nn.Conv2d(3, 32, 3, padding=1)

_loaded: dict[str, SimpleNamespace] = {}


def quiet():
    """The PyTorch warnings their 2018 code triggers, silenced (howtotrain's `QUIET`)."""
    return quiet_about(QUIET)


def load() -> SimpleNamespace:
    """Their Learner, MetaLearner and main.train_learner, from the checkout."""
    if NAME not in _loaded:
        modules = import_checkout(
            checkout(NAME),
            COMMIT,
            ("learner", "metalearner", "main"),
            stubs=("dataloader",),
            messages=QUIET,
        )
        _loaded[NAME] = SimpleNamespace(
            Learner=modules["learner"].Learner,
            MetaLearner=modules["metalearner"].MetaLearner,
            MetaLSTMCell=modules["metalearner"].MetaLSTMCell,
            train_learner=modules["main"].train_learner,
            preprocess_grad_loss=modules["main"].preprocess_grad_loss,
        )
    return _loaded[NAME]


def three_channels(x: torch.Tensor) -> torch.Tensor:
    """Grayscale images (n, 1, H, W) as their Learner's 3-channel input, the channel repeated."""
    if x.shape[1] == CHANNELS:
        return x
    if x.shape[1] != 1:
        raise ValueError(f"their Learner takes 3 channels; cannot make them from {x.shape[1]}")
    return x.expand(-1, CHANNELS, -1, -1).contiguous()


def their_episode(task: Task) -> tuple[torch.Tensor, ...]:
    """One fewshot task as main.py's train_input, train_target, test_input, test_target
    (class-major), and the order of fewshot's queries in theirs."""
    support, query, order = class_major(*task.tensors())
    n_class, n_shot, n_eval = support.shape[0], support.shape[1], query.shape[1]
    train_input = three_channels(support.reshape(-1, *support.shape[2:]))
    train_target = torch.LongTensor(np.repeat(range(n_class), n_shot))
    test_input = three_channels(query.reshape(-1, *query.shape[2:]))
    test_target = torch.LongTensor(np.repeat(range(n_class), n_eval))
    return train_input, train_target, test_input, test_target, order


class MarkdtwMetaLSTMReference(Reference):
    """Their Meta-LSTM: the meta-learner (LSTM, MetaLSTMCell with cI, the learner's initial
    parameters) is this module's state; the two learners are work space, outside it."""

    is_transductive = False  # their meta_test classifies the queries in eval mode

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        their = load()
        s = config.settings
        self._train_learner = their.train_learner
        self.source = (
            f"{REPOSITORY} at {COMMIT[:7]}, learner.py, metalearner.py, main.py (train_learner, "
            f"the training step and meta_test); 3-channel input from grayscale"
        )
        self.eval_inner_steps = s.eval_inner_steps
        self.inner_steps = s.inner_steps
        self.grad_clip = s.gradient_clip or None
        # their main.py: seeds, then the learners and the meta-learner, cI from the learner
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        learner_w_grad = their.Learner(config.image_size, BN_EPS, BN_MOMENTUM, config.train_ways)
        learner_wo_grad = copy.deepcopy(learner_w_grad)
        self.metalearner = their.MetaLearner(
            INPUT_SIZE, s.hidden_size, learner_w_grad.get_flat_params().size(0)
        )
        self.metalearner.metalstm.init_cI(learner_w_grad.get_flat_params())
        self.optim = torch.optim.Adam(self.metalearner.parameters(), config.outer_lr)
        self._learners = (learner_w_grad, learner_wo_grad)  # a tuple: not in state_dict

    def arguments(self, steps: int, support_size: int) -> SimpleNamespace:
        """What train_learner reads of their args: `epoch` passes over the support set in
        batches of `batch_size` (the whole set: one update a pass)."""
        return SimpleNamespace(epoch=steps, batch_size=support_size)

    def train_step(self, tasks: Task) -> float:
        """Their main.py's meta-training step on one episode."""
        if len(tasks) != 1:
            raise ValueError(f"their main.py updates on one episode at a time, got {len(tasks)}")
        train_input, train_target, test_input, test_target, _ = their_episode(tasks[0])
        with quiet():
            learner = self.adapted(train_input, train_target, self.inner_steps, query_mode=True)
            loss = learner.criterion(learner(test_input), test_target)
            self.optim.zero_grad()
            loss.backward()
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.metalearner.parameters(), self.grad_clip)
            self.optim.step()
        return loss.item()

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        """Their meta_test on each task: the query logits in fewshot's query order."""
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        logits = []
        with torch.enable_grad(), quiet():  # train_learner calls loss.backward()
            for i in range(len(tasks)):
                train_input, train_target, test_input, _, order = their_episode(tasks[i])
                learner = self.adapted(train_input, train_target, steps, query_mode=False)
                logits.append(fewshot_order(learner(test_input).detach(), order))
        self._learners[0].zero_grad()
        return torch.stack(logits)

    def adapted(self, train_input, train_target, steps: int, query_mode: bool):
        """Their learner after `steps` of the meta-learner on the support set, as main.py's
        train and meta_test make it: batch statistics reset, the learner with gradients in
        training mode, the one that answers the queries in training mode (`query_mode`, their
        training) or eval mode (their test)."""
        learner_w_grad, learner_wo_grad = self._learners
        args = self.arguments(steps, len(train_input))
        learner_w_grad.reset_batch_stats()
        learner_wo_grad.reset_batch_stats()
        learner_w_grad.train()
        learner_wo_grad.train(query_mode)
        cI = self._train_learner(learner_w_grad, self.metalearner, train_input, train_target, args)
        learner_wo_grad.transfer_params(learner_w_grad, cI)
        return learner_wo_grad


def build(method: str, config: TrainConfig) -> MarkdtwMetaLSTMReference:
    """markdtw's Meta-LSTM for fewshot's resolved `config` (method "meta-lstm")."""
    if method != "meta-lstm":
        raise KeyError(f"meta-learning-lstm-pytorch reference: unknown method {method!r}")
    s = config.settings
    if config.meta_batch != 1:
        raise ValueError("their main.py updates on one episode at a time: --meta-batch 1")
    if s.batch_norm not in (None, "inductive"):
        raise ValueError(
            "their meta_test classifies the queries in eval mode with the statistics the "
            "inner loop collected: --batch-norm inductive"
        )
    backbone = config.backbone or "conv4"
    if backbone != "conv4-32":
        print(
            f"note: their Learner is a Conv4 of 32 filters; fewshot's side runs {backbone!r}",
            flush=True,
        )
    return MarkdtwMetaLSTMReference(config)
