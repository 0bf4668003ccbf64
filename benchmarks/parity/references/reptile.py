"""Reptile, transcribed from Nichol, Achiam & Schulman 2018 (arXiv:1803.02999), Algorithm 2:

    for iteration = 1, 2, ...:
        sample tasks tau_1 .. tau_n
        for i = 1 .. n:  W_i = SGD(L_tau_i, phi, k)     (here: k steps of Adam)
        phi <- phi + epsilon * (1/n) sum_i (W_i - phi)

with the settings of the paper's Omniglot experiments (its code's defaults, supervised-reptile):
Adam with beta1 = 0 (betas 0, 0.999) for the k inner steps, on mini-batches of the task's
"train shots" (here a fewshot training episode's support and query examples together), each
task's examples shuffled and read in mini-batches without replacement; epsilon annealed
linearly from its initial value (fewshot's outer learning rate) to its final one over the run.
At test time: the same Adam for the evaluation steps on the support set, then the query set
predicted as one batch (transductive batch norm, the paper's Omniglot setting).

One choice differs from the paper's TensorFlow code and is stated here: that code keeps one
Adam optimizer, whose moment estimates and step count carry over from task to task; here, as
Algorithm 2's SGD(L, phi, k) reads, every task starts its inner optimizer afresh.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fewshot.tasks import Task
from fewshot.training.config import TrainConfig

from .base import Reference
from .network import initial_network

SOURCE = "transcription of Nichol et al. 2018, Algorithm 2"


class ReptileReference(Reference):
    """Batched Reptile (Algorithm 2) around fewshot's network, from its definition."""

    source = SOURCE
    is_transductive = True

    def __init__(
        self,
        network: torch.nn.Module,
        inner_lr: float,
        inner_steps: int,
        inner_batch: int | None,
        eval_inner_steps: int,
        epsilon: float,
        final_epsilon: float,
        iterations: int,
        seed: int = 0,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ) -> None:
        super().__init__()
        self.network = network
        self.inner_lr, self.inner_steps, self.inner_batch = inner_lr, inner_steps, inner_batch
        self.eval_inner_steps = eval_inner_steps
        self.epsilon, self.final_epsilon, self.iterations = epsilon, final_epsilon, iterations
        self.iteration = 0  # outer updates done
        self.generator = torch.Generator().manual_seed(seed)  # mini-batch order
        self.loss = loss

    def current_epsilon(self) -> float:
        """epsilon at this iteration: linear from `epsilon` (first) towards `final_epsilon`."""
        done = min(self.iteration / self.iterations, 1.0)
        return (1 - done) * self.epsilon + done * self.final_epsilon

    def minibatches(self, n: int, steps: int, size: int | None) -> list[torch.Tensor]:
        """`steps` index mini-batches of `size` (None: all n) read from shuffled examples,
        without replacement, reshuffling when they run out."""
        if size is None or size >= n:
            return [torch.arange(n)] * steps
        batches, order = [], torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if len(order) < size:
                order = torch.cat((order, torch.randperm(n, generator=self.generator)))
            batches.append(order[:size])
            order = order[size:]
        return batches

    def inner_loop(self, x, y, steps: int, size: int | None) -> torch.nn.Module:
        """W = k steps of Adam (betas 0, 0.999) on L_tau from the current weights phi."""
        adapted = copy.deepcopy(self.network)
        optimizer = torch.optim.Adam(adapted.parameters(), lr=self.inner_lr, betas=(0.0, 0.999))
        with torch.enable_grad():
            for batch in self.minibatches(len(x), steps, size):
                optimizer.zero_grad()
                loss = self.loss(adapted(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
        self.last_loss = loss.item()
        return adapted

    def train_step(self, tasks: Task) -> float:
        """phi <- phi + epsilon * mean_i (W_i - phi); returns the mean last inner loss."""
        phi = dict(self.network.named_parameters())
        moved = {name: torch.zeros_like(p) for name, p in phi.items()}
        losses = []
        for i in range(len(tasks)):
            task = tasks[i]
            x = torch.cat((task.support_x, task.query_x))
            y = torch.cat((task.support_y, task.query_y))
            adapted = self.inner_loop(x, y, self.inner_steps, self.inner_batch)
            for name, w in adapted.named_parameters():
                moved[name] += w.detach() - phi[name].detach()
            losses.append(self.last_loss)
        epsilon = self.current_epsilon()
        with torch.no_grad():
            for name, p in phi.items():
                p.add_(moved[name], alpha=epsilon / len(tasks))
        self.iteration += 1
        return sum(losses) / len(losses)

    def predict(self, tasks: Task, inner_steps: int | None = None) -> torch.Tensor:
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        logits = []
        for i in range(len(tasks)):
            task = tasks[i]
            adapted = self.inner_loop(task.support_x, task.support_y, steps, None)
            with torch.no_grad():
                logits.append(adapted(task.query_x))
        return torch.stack(logits)


def build(method: str, config: TrainConfig) -> ReptileReference:
    """Reptile with the numbers fewshot's resolved `config` holds (Omniglot: Nichol et al.'s)."""
    s = config.settings
    if s.inner_optimizer != "adam":
        raise ValueError("the Reptile reference transcribes the paper's Adam inner loop only")
    return ReptileReference(
        initial_network(config),
        inner_lr=s.inner_lr,
        inner_steps=s.inner_steps,
        inner_batch=s.inner_batch or None,
        eval_inner_steps=s.eval_inner_steps,
        epsilon=config.outer_lr,
        final_epsilon=s.final_outer_lr,
        iterations=config.iterations,
        seed=config.seed,
    )
