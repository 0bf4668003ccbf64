"""The inner loop that every gradient-based method shares (MAML, Meta-SGD, ANIL, Reptile, ...).

For each task, starting from phi_0 = theta, the support loss is differentiated and an inner
update rule (`fewshot.algorithms.rules`) takes a step:

    phi_{s+1} = rule(phi_s, grad_phi L_support(phi_s), state_s, s),   s = 0 .. S-1.

The pieces are swappable: the rule (one step size, learned step sizes, Adam, ...), which
parameters adapt (all, the head, a named set) and, separately, which are meta-learned, and an
optional `encoder` run once per task before the inner loop (ANIL's body). The whole trajectory
phi_0 .. phi_S is available (`trajectory(..., keep_all_steps=True)`), for losses after every
step, and the forward pass can read the step index with `current_inner_step()` (for per-step
batch-norm parameters).

How tasks run: theta is expanded into one copy per task and the forward pass is vmapped over
tasks (`torch.func.vmap`); plain `torch.autograd.grad` of the summed support losses gives each
task its own gradient, because the tasks are independent. A network of standard convolutional
layers runs as one grouped network instead, each task's channels a group (`grouped`: vmap's
convolution without its copies between layers). Every backward pass, the second-order one
included, is ordinary autograd, so fused kernels such as batch norm's stay exact. Without
`vectorize`, tasks run one at a time with plain calls; all compute the same numbers up to
rounding.

One file per job: `learner` (`GradientLearner`: settings and meta-training), `inner_loop`,
`parallel` (vmap, per task, chunks, each task's own buffers), `grouped` (tasks as groups),
`checkpointing` and `prediction`. The names below are importable from here, as before the split.
"""

from fewshot.algorithms.gradient.checkpointing import RecomputedStep, plain_tail
from fewshot.algorithms.gradient.inner_loop import (
    Trajectory,
    context_value,
    current_inner_step,
    inner_step,
)
from fewshot.algorithms.gradient.inner_loop import mini_batch as _mini_batch
from fewshot.algorithms.gradient.inner_loop import random_order as _random_order
from fewshot.algorithms.gradient.learner import GradientLearner, QueryResult, Selection
from fewshot.algorithms.gradient.parallel import (
    CPU_IMAGES_PER_PASS,
    LossFn,
    default_chunk_size,
    per_task_buffers,
)
from fewshot.algorithms.gradient.prediction import GradientPredictor

__all__ = [
    "CPU_IMAGES_PER_PASS",
    "GradientLearner",
    "GradientPredictor",
    "LossFn",
    "QueryResult",
    "RecomputedStep",
    "Selection",
    "Trajectory",
    "_mini_batch",
    "_random_order",
    "context_value",
    "current_inner_step",
    "default_chunk_size",
    "inner_step",
    "per_task_buffers",
    "plain_tail",
]
