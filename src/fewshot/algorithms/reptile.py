"""Reptile (Nichol, Achiam & Schulman, 2018): move the initialisation towards adapted weights.

For each task i of a meta-batch, k inner steps of SGD or Adam on the task's examples, from
theta, give phi_i; the outer update is

    theta <- theta + epsilon * mean_i (phi_i - theta),

with epsilon annealed linearly from its initial to its final value over the run. No gradient
flows through the inner loop. In fewshot the outer update is plain SGD with learning rate
epsilon on the "gradient" theta - mean_i(phi_i), which is exactly this interpolation, so the
training loop, its schedule and its checkpoint serve Reptile unchanged.

In meta-training a task's support and query examples are all training data for the inner loop
(the paper's "train shots"); evaluation adapts on the support set only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fewshot.algorithms.gradient import GradientLearner
from fewshot.algorithms.registry import InnerLoopSettings, Method, Problem, register, setting
from fewshot.algorithms.rules import SGD, Adam
from fewshot.errors import ConfigError
from fewshot.tasks import Task

INNER_OPTIMIZERS = ("adam", "sgd")


class Reptile(GradientLearner):
    """Reptile around any `nn.Module` (a copy is trained; the module passed in is unchanged).

    Args:
        inner_lr: the inner optimizer's learning rate.
        inner_optimizer: "adam" (with beta1 = 0, as the paper) or "sgd"; Adam's moments start
            from zero for every task.
        inner_batch: examples per inner step in meta-training (None: all of the task's).
        final_outer_lr: the value epsilon is annealed to, linearly, by the last iteration.
        options: `GradientLearner`'s other keyword arguments (eval_inner_batch, loss, adapted,
            vectorize, chunk_size, batch_norm).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 1e-3,
        inner_steps: int = 5,
        eval_inner_steps: int | None = 50,
        inner_optimizer: str = "adam",
        inner_batch: int | None = 10,
        final_outer_lr: float = 0.0,
        **options: Any,
    ) -> None:
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(
                f"inner_optimizer must be one of {', '.join(INNER_OPTIMIZERS)}, got "
                f"{inner_optimizer!r}."
            )
        if final_outer_lr < 0:
            raise ConfigError(f"`final_outer_lr` must be >= 0, got {final_outer_lr}.")
        rule = Adam(inner_lr, betas=(0.0, 0.999)) if inner_optimizer == "adam" else SGD(inner_lr)
        super().__init__(
            model,
            rule,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            first_order=True,
            inner_batch=inner_batch,
            **options,
        )
        self.final_outer_lr = final_outer_lr

    @classmethod
    def training_loss_label(cls, inner_steps: int | None) -> str:
        return "support loss at the last inner step"  # Reptile's outer step takes no query loss

    def meta_loss(self, tasks: Task) -> torch.Tensor:
        raise NotImplementedError("Reptile's outer update is not the gradient of a loss.")

    def training_step(self, tasks: Task) -> dict[str, float]:
        """Accumulate theta - mean_i(phi_i) into `.grad` (chunk by chunk) and return the mean
        support loss of the last inner step."""
        theta = dict(self.model.named_parameters())
        loss = 0.0
        for chunk in self.chunks(tasks):
            x = torch.cat([chunk.support_x, chunk.query_x], dim=1)
            y = torch.cat([chunk.support_y, chunk.query_y], dim=1)
            path = self.trajectory(x, y, self.inner_steps, False, self.inner_batch)
            for name in self.meta_learned_names:
                p = theta[name]
                difference = (p.detach() - path.params[-1][name]).sum(0) / len(tasks)
                p.grad = difference if p.grad is None else p.grad + difference
            loss += path.support_losses[-1].sum().item() / len(tasks)
        return {"loss": loss}

    def configure_optimizers(self, lr: float, iterations: int):
        """SGD with learning rate epsilon, annealed linearly to `final_outer_lr`."""
        optimizer = torch.optim.SGD(self.parameters(), lr=lr)
        final_fraction = self.final_outer_lr / lr

        def anneal(iteration: int) -> float:
            done = min(iteration / iterations, 1.0)
            return (1 - done) + done * final_fraction

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, anneal)


@dataclass
class ReptileSettings(InnerLoopSettings):
    inner_optimizer: str | None = setting(
        "Reptile's inner optimizer: Adam with beta1 = 0, or SGD.",
        fallback="adam",
        choices=INNER_OPTIMIZERS,
    )
    inner_batch: int | None = setting(
        "Examples per inner step in meta-training (0: all of the task's).", fallback=0
    )
    eval_inner_batch: int | None = setting(
        "Examples per inner step when adapting a trained model (0: all).", fallback=0
    )
    final_outer_lr: float | None = setting(
        "The value epsilon (`outer_lr`) is annealed to, linearly, by the last iteration.",
        fallback=0.0,
    )


def build(settings: ReptileSettings, problem: Problem) -> Reptile:
    # Resolved settings: the paper's values or the fallbacks.
    assert settings.inner_lr is not None and settings.inner_optimizer is not None
    assert settings.final_outer_lr is not None
    return Reptile(
        problem.network(),
        inner_lr=settings.inner_lr,
        inner_optimizer=settings.inner_optimizer,
        inner_batch=settings.inner_batch or None,
        eval_inner_batch=settings.eval_inner_batch or None,
        final_outer_lr=settings.final_outer_lr,
        **settings.learner_arguments(problem),
    )


# Nichol et al.'s Omniglot command (supervised-reptile README, 5-way 1-shot): --train-shots 10
# (here 1 shot + 9 queries per class), --inner-batch 10 --inner-iters 5 --learning-rate 0.001,
# --meta-step 1 --meta-step-final 0 --meta-batch 5 --meta-iters 100000, --eval-iters 50 with
# --eval-batch 5 (the whole 5-way 1-shot support set), --transductive. Sinusoid: the sine-wave
# demo published with the paper (50 points a task in mini-batches of 10, one epoch of SGD at
# 0.02, epsilon 0.1 annealed to 0 over 30,000 tasks, 32 steps on 10 points at test).
REPTILE_OMNIGLOT = dict(
    shots=1,
    queries=15,
    train_queries=9,
    meta_batch=5,
    inner_lr=1e-3,
    inner_steps=5,
    eval_inner_steps=50,
    inner_batch=10,
    outer_lr=1.0,
    iterations=100000,
    val_every=1000,
)
register(
    Method(
        name="reptile",
        algorithm=Reptile,
        settings=ReptileSettings,
        paper="Nichol, Achiam & Schulman 2018, On First-Order Meta-Learning Algorithms "
        "(arXiv:1803.02999)",
        build=build,
        batch_norm="transductive",
        defaults={
            "sinusoid": dict(
                shots=10,
                queries=10,
                train_queries=40,
                meta_batch=1,
                inner_optimizer="sgd",
                inner_lr=0.02,
                inner_steps=5,
                inner_batch=10,
                eval_inner_steps=32,
                outer_lr=0.1,
                iterations=30000,
                val_every=2000,
            ),
            "omniglot": REPTILE_OMNIGLOT,
            # Its miniImageNet command: --train-shots 15 (1 shot + 14 queries per class),
            # --inner-iters 8, otherwise as on Omniglot.
            "mini-imagenet": {**REPTILE_OMNIGLOT, "train_queries": 14, "inner_steps": 8},
        },
    )
)
