# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # MAML on sinusoids, and why the second-order gradient matters
#
# Meta-learning is learning to transfer. Each task here is a sine wave
# y = A sin(x − φ), amplitude A ∈ [0.1, 5] and phase φ ∈ [0, π] drawn at random, of which we
# see only K = 10 points (the *support set*); the model is judged on other points of the
# same wave (the *query set*). No single network fits every wave: what can be learned is a
# starting point θ from which a gradient step or a few on the 10 points fit the wave at hand.
# MAML (Finn et al., 2017) learns that starting point directly:
#
#     min_θ  Σ_tasks L_query(φ),    φ = θ − α ∇_θ L_support(θ)
#
# Its meta-gradient goes back through the inner step:
#
#     ∇_θ L_query(φ) = (I − α ∇²_θ L_support(θ)) ∇_φ L_query(φ)
#
# First-order MAML (FOMAML) drops the Hessian term and uses ∇_φ L_query(φ) alone, as if the
# inner step did not depend on θ. That term is the only part of the meta-gradient that sees
# how θ shapes its own adaptation step. This tutorial trains both on the same tasks and
# compares them after 0, 1 and 10 adaptation steps.
#
# **Sizes are reduced** so that the page builds in about a minute on two CPU cores: 5,000
# meta-iterations of 25 tasks instead of `fewshot train`'s 8,000 (Finn et al. train 70,000).
# The full-size figures are measured in [Results](../results.md#sinusoid-regression):
# `zoo/maml-sinusoid`, 8,000 iterations, K = 10, gives MSE 2.964 before adaptation, 0.447
# after 1 step and 0.131 after 10 on 600 held-out tasks; Finn et al.'s Figure 2 redrawn from
# it is in [Figures](../plots.md). No full-size first-order sinusoid run is in the zoo; the
# zoo's first-order run is on Omniglot (`zoo/fomaml-omniglot-5w1s`, same results page).

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import fewshot
from fewshot.training import evaluate

torch.set_num_threads(1)  # the 1-40-40-1 network runs fastest on one thread
ITERATIONS = 5000  # reduced; see above
META_BATCH = 25  # tasks per meta-iteration, as in the paper
tasks = fewshot.SinusoidTasks(shots=10, queries=10)  # K = 10 support, 10 query points


def make_maml(first_order: bool) -> fewshot.MAML:
    """Finn et al.'s sinusoid setting: one inner step of 0.01 in training, 10 at test."""
    torch.manual_seed(0)  # the same initial network for both
    return fewshot.MAML(
        fewshot.SinusoidMLP(),
        inner_lr=0.01,
        inner_steps=1,
        eval_inner_steps=10,
        loss=F.mse_loss,
        first_order=first_order,
    )


# %% [markdown]
# ## Meta-training
#
# The loop is the one in the README: sample a meta-batch of tasks, `training_step`
# back-propagates the meta-loss, the optimizer (Adam, 1e-3) updates θ. Both learners see
# the same tasks in the same order (the same generator seed).


# %%
def meta_train(maml: fewshot.MAML) -> fewshot.MAML:
    optimizer, _ = maml.configure_optimizers(lr=1e-3, iterations=ITERATIONS)  # Adam, no schedule
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(1, ITERATIONS + 1):
        batch = tasks.sample(META_BATCH, generator)
        optimizer.zero_grad()
        metrics = maml.training_step(batch)
        optimizer.step()
        if step % 1000 == 0:
            print(f"iteration {step}: query MSE after the inner step {metrics['loss']:.3f}")
    print(f"{ITERATIONS} iterations in {time.perf_counter() - start:.0f} s")
    return maml


untrained = make_maml(first_order=False)  # a random initialisation, for reference
print("second-order MAML")
maml = meta_train(make_maml(first_order=False))
print("first-order MAML")
fomaml = meta_train(make_maml(first_order=True))

# %% [markdown]
# ## Held-out tasks: MSE after 0, 1 and 10 steps
#
# `evaluate` applies the evaluation protocol: 600 tasks never drawn in training (the same
# 600 for every model, seed 0), the mean query MSE and its 95% confidence interval.
# `inner_steps` sets the number of adaptation steps; 0 is the initialisation itself.

# %%
learners = {"random init": untrained, "MAML": maml, "FOMAML": fomaml}
results = {
    name: {steps: evaluate(learner, tasks, episodes=600, inner_steps=steps) for steps in (0, 1, 10)}
    for name, learner in learners.items()
}
print(f"{'':12}{'before':>18}{'1 step':>18}{'10 steps':>18}")
for name, by_steps in results.items():
    cells = "".join(f"{r.mean:>10.3f} ± {r.ci95:.3f}" for r in by_steps.values())
    print(f"{name:12}{cells}")

# %% [markdown]
# Read the table row by row. The random initialisation improves little with adaptation:
# 10 points and a few small steps fit a wave only from a starting point trained for it,
# which is what "learning to transfer" means. The two meta-trained rows differ only in the
# Hessian term.
#
# Both were scored on the same tasks, so their difference is best measured task by task
# (a paired comparison, as `fewshot compare` makes for runs): `predict` adapts to each
# task's support set and predicts its queries. The gap is computed here, not written by
# hand: at this reduced budget it moves with the budget and the seed, and its confidence
# interval says how far to trust it.

# %%
held_out = tasks.sample(600, torch.Generator().manual_seed(2))


def per_task_mse(learner: fewshot.MAML, steps: int) -> torch.Tensor:
    predictions = learner.predict(held_out, inner_steps=steps).detach()
    return (predictions - held_out.query_y).pow(2).mean(dim=(1, 2))


for steps in (1, 10):
    gap = per_task_mse(fomaml, steps) - per_task_mse(maml, steps)
    half_width = 1.96 * gap.std().item() / len(gap) ** 0.5
    print(
        f"after {steps:>2} step(s): FOMAML − MAML = {gap.mean().item():+.3f} ± {half_width:.3f}"
        f" (paired, 95% CI, {len(gap)} tasks; FOMAML worse on {(gap > 0).float().mean():.0%})"
    )

# %% [markdown]
# ## The adapted curves
#
# One held-out task: its true wave, its 10 support points, and each model's prediction
# over the whole input range before adaptation and after 1 and 10 steps.
# `adapt(support_x, support_y, inner_steps=s)` returns a predictor for the adapted network;
# inputs keep the leading task dimension (here 1).

# %%
task, amplitude, phase = tasks.sample_with_functions(1, torch.Generator().manual_seed(1))
grid = torch.linspace(-5, 5, 200).reshape(1, -1, 1)
truth = amplitude * torch.sin(grid - phase)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
for ax, (name, learner) in zip(axes, learners.items()):
    ax.plot(grid[0, :, 0], truth[0, :, 0], color="tab:red", lw=2, label="true wave")
    ax.scatter(
        task.support_x[0, :, 0],
        task.support_y[0, :, 0],
        marker="^",
        color="black",
        zorder=3,
        label="K = 10 support points",
    )
    for steps, style in ((0, ":"), (1, "--"), (10, "-")):
        predictor = learner.adapt(task.support_x, task.support_y, inner_steps=steps)
        prediction = predictor(grid).detach()
        mse = (prediction - truth).pow(2).mean().item()
        ax.plot(
            grid[0, :, 0],
            prediction[0, :, 0],
            style,
            color="tab:blue",
            label=f"{steps} step{'s' * (steps != 1)} (MSE {mse:.2f})",
        )
    ax.set_title(name)
    ax.set_xlabel("x")
    ax.legend(fontsize=7, loc="lower left")
axes[0].set_ylabel("y")
fig.suptitle(f"y = {amplitude.item():.2f} sin(x − {phase.item():.2f}), one held-out task")
fig.tight_layout()
plt.show()

# %% [markdown]
# The MSE in each legend is against the true wave over [−5, 5], for this one task; the
# table above is the average over 600. To run the full-size experiment from the command
# line, with figures like these for the trained run:
#
# ```bash
# fewshot train --out runs/maml-sinusoid                  # MAML, 8,000 iterations
# fewshot train --first-order --out runs/fomaml-sinusoid  # FOMAML, the same budget
# fewshot compare runs/maml-sinusoid runs/fomaml-sinusoid # paired test on the same tasks
# fewshot plot runs/maml-sinusoid                         # Figure 2, adaptation curve
# ```
