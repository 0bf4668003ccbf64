"""MAML, FOMAML, Meta-SGD and ANIL as learn2learn 0.2.0 runs them, around fewshot's Conv4.

learn2learn's standard loop (examples/vision/maml_omniglot.py): per task `clone()`, `adapt()`
on the support loss for each inner step, the query loss of the adapted clone, averaged over
the meta-batch, then one Adam step with the outer learning rate. Meta-SGD wraps the network
in `l2l.algorithms.MetaSGD`, whose per-coordinate step sizes (initialised to the inner learning
rate) are among the Adam step's parameters. ANIL as learn2learn's ANIL example
(examples/vision/anil_fc100.py): `l2l.algorithms.MAML` around the head only, the body's
features computed once per task and learned by the outer loop; the support and the query
features are computed as two batches (the example passes both as one), so that batch norm
normalises them as fewshot's transductive policy does. Batch norm always uses the batch's
statistics (Conv4 keeps no running statistics), as learn2learn's examples, which never leave
train mode.
"""

from __future__ import annotations

import learn2learn as l2l
import torch
import torch.nn.functional as F

from fewshot.tasks import Task
from fewshot.training.config import TrainConfig

from .base import Reference
from .network import initial_network

FILES = {
    "maml": "learn2learn/algorithms/maml.py",
    "fomaml": "learn2learn/algorithms/maml.py",
    "meta-sgd": "learn2learn/algorithms/meta_sgd.py",
    "anil": "learn2learn/algorithms/maml.py (around the head, as examples/vision/anil_fc100.py)",
}


class Learn2LearnReference(Reference):
    """One of learn2learn's gradient-based methods, trained by learn2learn's loop."""

    is_transductive = True  # each query set is normalised with its own batch statistics

    def __init__(
        self,
        method: str,
        network: torch.nn.Module,
        inner_lr: float,
        inner_steps: int,
        eval_inner_steps: int,
        first_order: bool,
        outer_lr: float,
    ) -> None:
        super().__init__()
        if method not in FILES:
            raise KeyError(f"learn2learn reference: unknown method {method!r}")
        self.method = method
        self.source = f"learn2learn {l2l.__version__}, {FILES[method]}"
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        first_order = first_order or method == "fomaml"
        if method == "meta-sgd":
            self.learner = l2l.algorithms.MetaSGD(network, lr=inner_lr, first_order=first_order)
        elif method == "anil":  # the head adapts; the body is learned by the outer loop only
            self.body = network.features
            self.learner = l2l.algorithms.MAML(network.head, lr=inner_lr, first_order=first_order)
        else:
            self.learner = l2l.algorithms.MAML(network, lr=inner_lr, first_order=first_order)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=outer_lr)

    def query_logits(self, task: Task, steps: int, first_order: bool | None = None):
        """Adapt a clone on one task's support set for `steps` steps; its query logits."""
        support_x, support_y, query_x = task.support_x, task.support_y, task.query_x
        if self.method == "anil":
            support_x, query_x = self.body(support_x), self.body(query_x)
        learner = self.learner.clone()
        for _ in range(steps):
            loss = F.cross_entropy(learner(support_x), support_y)
            learner.adapt(loss, first_order=first_order)
        return learner(query_x)

    def train_step(self, tasks: Task) -> float:
        """learn2learn's meta-update: per task clone/adapt/query loss, mean, one Adam step."""
        self.optimizer.zero_grad()
        total = 0.0
        for i in range(len(tasks)):
            task = tasks[i]
            loss = F.cross_entropy(self.query_logits(task, self.inner_steps), task.query_y)
            (loss / len(tasks)).backward()
            total += loss.item()
        self.optimizer.step()
        return total / len(tasks)

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        with torch.enable_grad():  # the evaluator runs under no_grad; adapting needs gradients
            logits = [
                self.query_logits(tasks[i], steps, first_order=True).detach()
                for i in range(len(tasks))
            ]
        return torch.stack(logits)


def build(method: str, config: TrainConfig) -> Learn2LearnReference:
    """The learn2learn reference of `method` for fewshot's resolved `config`."""
    s = config.settings
    return Learn2LearnReference(
        method,
        initial_network(config),
        inner_lr=s.inner_lr,
        inner_steps=s.inner_steps,
        eval_inner_steps=s.eval_inner_steps,
        first_order=bool(s.first_order),
        outer_lr=config.outer_lr,
    )
