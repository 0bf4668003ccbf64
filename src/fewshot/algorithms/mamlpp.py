"""MAML++ (Antoniou, Edwards & Storkey, 2019, "How to train your MAML").

MAML with five fixes that make its training stable and its results better, each a switch named
as in the paper, all on by default; with every switch off, MAML++ is MAML:

- MSL, multi-step loss: the meta-loss is sum_s w_s L_query(phi_s) over the inner steps
  s = 1..S, with the weights annealed towards the last step over the first `msl_epochs`
  epochs (`msl_weights`), and the last step's loss alone after them;
- DA, derivative-order annealing: first-order meta-gradients for the first `da_epochs` epochs,
  second order after them;
- BNWB, per-step batch-norm weights and biases (inner step s uses row s), and BNRS, per-step
  batch-norm running statistics, collected from step s's batches in meta-training
  (`batchnorm.PerStepBatchNorm`);
- LSLR, learned inner step sizes per layer and per step (`rules.PerLayerPerStepSGD`);
- CA, cosine annealing of the outer learning rate to `min_outer_lr` over the run.

An epoch is `iterations_per_epoch` meta-iterations (500 in the paper); the learner counts its
own meta-iterations (`iterations_done`, saved with its weights), so a resumed run continues the
schedules where it stopped.

Batch norm: as in the paper's code, BNRS collects per-step running statistics in
meta-training, but prediction normalises with batch statistics: the query set as one batch
("transductive", the paper's code and the default) or the support set plus one query
("inductive"). Normalising with the collected statistics instead was measured and fails: the
network and its learned inner rates were meta-trained under batch statistics
(docs/methods/mamlpp.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from fewshot.algorithms.batchnorm import (
    per_step_batch_norm_,
    per_task_copies,
    running_statistics,
    tracking_statistics,
)
from fewshot.algorithms.gradient import GradientLearner
from fewshot.algorithms.recipes import FINN_2017
from fewshot.algorithms.registry import GradientSettings, Method, Problem, register, setting
from fewshot.algorithms.rules import SGD, InnerRule, Params, PerLayerPerStepSGD
from fewshot.errors import ConfigError, require_positive
from fewshot.tasks import Task

# The paper's floor on the weight of each step but the last: 0.03 / S.
MSL_FLOOR = 0.03


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """The weights w_1..w_S of the query losses after each inner step at `epoch` (MSL).

    All start at 1/S. Every epoch each weight but the last falls by 1/(S * msl_epochs), down to
    no less than 0.03/S, and the last rises by what they lose, so they always sum to one. From
    epoch `msl_epochs` on, the last step's loss alone counts.
    """
    if epoch >= msl_epochs:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / msl_epochs
    floor = MSL_FLOOR / steps
    earlier = max(1.0 / steps - epoch * decay, floor)
    last = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [earlier] * (steps - 1) + [last]


class MAMLpp(GradientLearner):
    """MAML++ around any `nn.Module`.

    Args:
        model: the network (a copy is trained, its batch-norm layers made per-step with BNWB or
            BNRS; the module passed in is left as it was).
        inner_lr: the inner step size alpha (with LSLR: the initial value of every learned one).
        inner_steps: S, inner steps per task in meta-training.
        msl: the multi-step loss, sum_s w_s L_query(phi_s) over the inner steps.
        da: derivative-order annealing, first order for the first `da_epochs` epochs.
        bnwb: per-step batch-norm weights and biases.
        bnrs: per-step batch-norm running statistics.
        lslr: learned inner step sizes per layer and per step.
        ca: cosine annealing of the outer learning rate to `min_outer_lr`.
        msl_epochs: epochs over which MSL anneals its weights.
        da_epochs: epochs of first-order meta-gradients with DA.
        min_outer_lr: the outer learning rate that CA anneals to by the last iteration.
        iterations_per_epoch: meta-iterations per epoch, the unit of the schedules.
        first_order: first-order meta-gradients throughout (DA then has no effect).
        options: `GradientLearner`'s other keyword arguments (eval_inner_steps, loss, adapted,
            meta_learned, vectorize, chunk_size, batch_norm). With BNWB, the batch-norm weights
            and biases are meta-learned per step but not adapted, as in the paper's code,
            unless `adapted` says otherwise.
    """

    iterations_done: torch.Tensor  # a buffer: the meta-iterations trained, the schedules' clock

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        *,
        msl: bool = True,
        msl_epochs: int = 10,
        da: bool = True,
        da_epochs: int = 50,
        bnwb: bool = True,
        bnrs: bool = True,
        lslr: bool = True,
        ca: bool = True,
        min_outer_lr: float = 1e-5,
        iterations_per_epoch: int = 500,
        first_order: bool = False,
        **options: Any,
    ) -> None:
        require_positive(inner_steps=inner_steps, msl_epochs=msl_epochs)
        require_positive(iterations_per_epoch=iterations_per_epoch)
        if da_epochs < 0 or min_outer_lr < 0:
            raise ConfigError("`da_epochs` and `min_outer_lr` must be >= 0.")
        if bnrs and options.get("checkpoint_inner"):
            raise ConfigError(
                "checkpoint_inner recomputes forward passes, which would update BNRS's running "
                "statistics twice; turn one off (`bnrs=False` or `checkpoint_inner=False`)."
            )
        model = copy.deepcopy(model)
        batch_norm_params = []
        if bnwb or bnrs:
            batch_norm_params = per_step_batch_norm_(
                model, inner_steps, per_step_weights=bnwb, running_statistics=bnrs, momentum=0.1
            )
        if bnwb and batch_norm_params and options.get("adapted") is None:
            fixed = set(batch_norm_params)
            learned = {n for n, p in model.named_parameters() if p.requires_grad}  # not frozen
            options["adapted"] = lambda name: name not in fixed and name in learned
        rule: InnerRule | Callable[[Params], InnerRule] = SGD(inner_lr)
        if lslr:
            rule = partial(PerLayerPerStepSGD, steps=inner_steps, lr=inner_lr)
        super().__init__(model, rule, inner_steps=inner_steps, first_order=first_order, **options)
        self.inner_lr = inner_lr
        self.msl, self.da, self.bnwb, self.bnrs, self.lslr, self.ca = msl, da, bnwb, bnrs, lslr, ca
        self.msl_epochs, self.da_epochs = msl_epochs, da_epochs
        self.min_outer_lr, self.iterations_per_epoch = min_outer_lr, iterations_per_epoch
        self.register_buffer("iterations_done", torch.zeros((), dtype=torch.long))

    @property
    def epoch(self) -> int:
        """The current epoch, iterations_done // iterations_per_epoch: the clock of MSL's
        and DA's schedules."""
        return int(self.iterations_done) // self.iterations_per_epoch

    def query_loss_weights(self) -> list[float]:
        """w_1..w_S at the current epoch: MSL's, or the last step's loss alone without MSL."""
        if not self.msl:
            return super().query_loss_weights()
        return msl_weights(self.inner_steps, self.epoch, self.msl_epochs)

    @property
    def first_order(self) -> bool:
        """Whether the current iteration's meta-gradient is first order: `first_order` as
        given, or DA's first epochs."""
        return self.always_first_order or (self.da and self.epoch < self.da_epochs)

    @first_order.setter
    def first_order(self, value: bool) -> None:
        self.always_first_order = value

    def training_step(self, tasks: Task) -> dict[str, float]:
        # With BNRS, each task updates its own copy of the running statistics; the copies are
        # averaged after the meta-batch, the same as updating with the tasks' mean batch
        # statistics, however the tasks are chunked or vectorised.
        own = running_statistics(self.model)
        copies = per_task_copies(own, len(tasks)) if own else None
        with self.per_task_buffers(copies), tracking_statistics():
            metrics = super().training_step(tasks)
        with torch.no_grad():
            for name, buffer in own.items():
                assert copies is not None  # made of `own`, which is not empty
                buffer.copy_(copies[name].mean(0))
        self.iterations_done += 1
        return metrics

    def configure_optimizers(self, lr: float, iterations: int):
        """Adam; with CA, its learning rate cosine-annealed from `lr` to `min_outer_lr`."""
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        if not self.ca:
            return optimizer, None
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=iterations, eta_min=self.min_outer_lr
        )
        return optimizer, schedule


@dataclass
class MAMLppSettings(GradientSettings):
    msl: bool | None = setting(
        "MSL: the query loss after every inner step, annealed towards the last.", fallback=True
    )
    msl_epochs: int | None = setting("Epochs over which MSL anneals its weights.", fallback=10)
    da: bool | None = setting(
        "DA: first-order meta-gradients for the first `da_epochs` epochs.", fallback=True
    )
    da_epochs: int | None = setting("Epochs of first-order meta-gradients with DA.", fallback=50)
    bnwb: bool | None = setting(
        "BNWB: batch-norm weights and biases per inner step.", fallback=True
    )
    bnrs: bool | None = setting(
        "BNRS: batch-norm running statistics per inner step.", fallback=True
    )
    lslr: bool | None = setting(
        "LSLR: learned inner step sizes per layer and per step.", fallback=True
    )
    ca: bool | None = setting(
        "CA: cosine annealing of the outer learning rate to `min_outer_lr`.", fallback=True
    )
    min_outer_lr: float | None = setting(
        "The outer learning rate CA anneals to by the last iteration.", fallback=1e-5
    )
    iterations_per_epoch: int | None = setting(
        "Meta-iterations per epoch, the unit of the MSL and DA schedules.", fallback=500
    )

    def check(self, run) -> None:
        super().check(run)
        # Resolved settings: the paper's values or the fallbacks.
        assert self.msl_epochs is not None and self.iterations_per_epoch is not None
        assert self.da_epochs is not None and self.min_outer_lr is not None
        require_positive(msl_epochs=self.msl_epochs, iterations_per_epoch=self.iterations_per_epoch)
        if self.da_epochs < 0 or self.min_outer_lr < 0:
            raise ConfigError("`da_epochs` and `min_outer_lr` must be >= 0.")
        if self.ca and self.min_outer_lr > run.outer_lr:
            raise ConfigError(
                f"`min_outer_lr` ({self.min_outer_lr}) is above `outer_lr` ({run.outer_lr}); "
                "lower it, or turn cosine annealing off with `ca=False`."
            )


def build(settings: MAMLppSettings, problem: Problem) -> MAMLpp:
    switches = ("msl", "msl_epochs", "da", "da_epochs", "bnwb", "bnrs", "lslr", "ca")
    # Resolved settings: the paper's values or the fallbacks.
    assert settings.inner_lr is not None and settings.min_outer_lr is not None
    assert settings.iterations_per_epoch is not None
    return MAMLpp(
        problem.network(),
        inner_lr=settings.inner_lr,
        min_outer_lr=settings.min_outer_lr,
        iterations_per_epoch=settings.iterations_per_epoch,
        **{name: getattr(settings, name) for name in switches},
        **settings.learner_arguments(problem),
    )


# Antoniou et al.'s Omniglot 5-way 1-shot configuration (omniglot_maml++-omniglot_1_8_0.1_64_5):
# 8 tasks a batch, 1 target example per class, 5 inner steps at alpha = 0.1 in training and at
# test, Adam at 1e-3 annealed to 1e-5, 100 epochs of 500 iterations, MSL over 10 epochs; DA's
# 50 epochs are the paper's text (the released configurations train second order throughout).
# The paper has no sinusoid experiment: MAML's setting with MAML++'s 5 inner steps, without
# LSLR, whose learned rates (starting at 0.01, moved by Adam's 1e-3 steps) made the sinusoid
# MLP's inner loop diverge within 700 iterations (docs/methods/mamlpp.md).
register(
    Method(
        name="maml++",
        algorithm=MAMLpp,
        settings=MAMLppSettings,
        paper="Antoniou, Edwards & Storkey 2019, How to train your MAML (ICLR)",
        build=build,
        batch_norm="transductive",
        defaults={
            "sinusoid": {
                **FINN_2017["sinusoid"],
                "inner_steps": 5,
                "iterations_per_epoch": 100,
                "lslr": False,
            },
            "omniglot": dict(
                shots=1,
                queries=15,
                train_queries=1,
                meta_batch=8,
                inner_lr=0.1,
                inner_steps=5,
                eval_inner_steps=5,
                outer_lr=1e-3,
                iterations=50000,
                val_every=500,
            ),
        },
    )
)
