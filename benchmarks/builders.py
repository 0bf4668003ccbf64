"""The benchmark's workloads built for one library, inside a process of its own.

A workload is built into a `Bench`: a step function that does one unit of work on data drawn
before timing starts (so sampling never enters an algorithm's timing, and every library sees
the very same tasks), the number of tasks or episodes one step covers, and the numbers that
show the libraries computed the same thing: the loss and the gradient norm of one meta-gradient
taken from the same initialisation on the same meta-batch, before any optimiser step.

Only the library being measured is imported (learn2learn pulls in gym and scipy, which would
otherwise inflate every process's memory). fewshot itself is imported everywhere, because it
provides the data, the task sampler and the Conv4 network that all libraries share.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from workloads import Workload

import fewshot
from fewshot.algorithms.registry import default_chunk_size
from fewshot.models import ResNet12, body_and_head
from fewshot.tasks import Task
from fewshot.training.loop import meta_step

SEED = 0
OUTER_LR = 1e-3  # Adam, as in both papers
PRESAMPLED = 4  # meta-batches drawn before timing and cycled through
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # square float32 matmul for the FLOP/s reference
SAMPLING_BATCH = 32  # episodes per call for the "fewshot-batched" sampling row
RANDOM_CLASSES = 20  # of 20 random 84x84 RGB images each, for the ResNet-12 workload

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PerTask = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], ...]
MetaGrad = Callable[[PerTask], torch.Tensor]


@dataclass
class Bench:
    """A (workload, library) ready to time: `step(i)` does step i's work.

    `check` holds the first meta-gradient's loss and norm (empty where nothing is comparable);
    `flops_per_step` is set where the FLOPs are known analytically (the matmul), and
    `reference_flops` counts one step's FLOPs the same way whatever the library (gradient-based
    methods only).
    """

    step: Callable[[int], object]
    units_per_step: int
    check: dict[str, float]
    flops_per_step: int | None = None
    reference_flops: Callable[[], int] | None = None


def package_version(library: str) -> tuple[str, str]:
    """The package a library row runs on and its installed version, for the report."""
    if library.startswith("fewshot"):
        return "fewshot", fewshot.__version__
    if library in ("reference", "torch"):
        return "torch", torch.__version__
    return library, importlib.metadata.version(library)


def build(workload: Workload, library: str, device: str, chunk_size: int | None = None) -> Bench:
    """Set up `library` on `workload`: data, model and optimiser, nothing timed yet.

    `chunk_size` replaces the command line's chunk size in fewshot's vectorised MAML rows.
    """
    if library not in workload.libraries:
        raise ValueError(f"{workload.name} runs {workload.libraries}, not {library!r}")
    torch.manual_seed(SEED)
    random.seed(SEED)  # learn2learn's samplers draw from Python's `random`
    if workload.kind in ("sinusoid", "omniglot-maml", "resnet12-maml"):
        return build_maml(workload, library, torch.device(device), chunk_size)
    builders = {"matmul": build_matmul, "protonet": build_protonet, "sampling": build_sampling}
    return builders[workload.kind](workload, library, torch.device(device))


# --- data -------------------------------------------------------------------------------


def omniglot_train() -> tuple[torch.Tensor, torch.Tensor]:
    """Omniglot's Vinyals meta-training part: uint8 images (n, 1, 28, 28) and labels.

    Read through fewshot's loader from $FEWSHOT_DATA_ROOT (decoded once, then cached).
    """
    characters = fewshot.load_omniglot()
    return fewshot.omniglot_split(characters, "vinyals", "train")


def draw_tasks(workload: Workload, device: torch.device) -> list[Task]:
    """`PRESAMPLED` meta-batches of the workload's tasks, on `device`, from a fixed seed."""
    generator = torch.Generator().manual_seed(SEED)
    if workload.kind == "sinusoid":
        sampler = fewshot.SinusoidTasks(workload.shots, workload.queries)
    elif workload.kind == "resnet12-maml":
        images = torch.randint(0, 256, (RANDOM_CLASSES * 20, 3, 84, 84), generator=generator)
        labels = torch.arange(RANDOM_CLASSES).repeat_interleave(20)
        sampler = fewshot.TaskSampler(
            images.to(torch.uint8), labels, workload.ways, workload.shots, workload.queries
        )
    else:
        images, labels = omniglot_train()
        sampler = fewshot.TaskSampler(
            images, labels, workload.ways, workload.shots, workload.queries
        )
    return [sampler.sample(workload.meta_batch, generator).to(device) for _ in range(PRESAMPLED)]


def per_task(tasks: Task) -> PerTask:
    """A meta-batch split into per-task tensors, done before timing for the per-task loops."""
    return tuple(tasks[i].tensors() for i in range(len(tasks)))


# --- MAML, Meta-SGD, ANIL ----------------------------------------------------------------------


def build_maml(
    workload: Workload, library: str, device: torch.device, chunk_size: int | None = None
) -> Bench:
    """A gradient-based method (`workload.method`: MAML, Meta-SGD or ANIL) on the sinusoid MLP
    or Omniglot Conv4, with an Adam outer step, in one of three libraries.

    The network is built from the same seed in every library, so all start from the same
    initialisation; the peers get fewshot's own Conv4 class, so the network is identical.
    fewshot's methods train a copy of it, so their parameters and gradients are read from the
    algorithm, never from `model`.
    """
    model, loss_fn, inner_lr = maml_setting(workload)
    model = model.to(device)
    batches = draw_tasks(workload, device)
    if library.startswith("fewshot"):
        # "fewshot": vectorised with the chunk size `fewshot train` would use (default_chunk_size:
        # 4 tasks for these Conv4 workloads on a CPU, otherwise the whole meta-batch);
        # "fewshot-per-task": one task at a time.
        if chunk_size is None:
            images = workload.kind != "sinusoid"
            examples = workload.ways * (workload.shots + workload.queries)
            chunk_size = default_chunk_size(images, workload.meta_batch, examples, device.type)
        method = "maml" if library == "fewshot-maml" else workload.method
        learner = fewshot_learner(
            workload,
            method,
            model,
            loss_fn,
            inner_lr,
            library != "fewshot-per-task",
            chunk_size,
            checkpoint_inner=library == "fewshot-checkpoint",
        )
        optimizer = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)
        # training_step is what meta_step runs: one chunk's graph at a time.
        check = first_meta_gradient(
            list(learner.parameters()), lambda: learner.training_step(batches[0])["loss"]
        )
        return Bench(
            lambda i: meta_step(learner, optimizer, batches[i % len(batches)]),
            workload.meta_batch,
            check,
            reference_flops=lambda: per_task_flops(workload, batches[0]),
        )
    peers = {"learn2learn": learn2learn_maml, "higher": higher_maml}
    if workload.method == "anil":
        peers = {"learn2learn": learn2learn_anil}
    meta_grad, params = peers[library](model, loss_fn, inner_lr, workload)
    split = [per_task(tasks) for tasks in batches]
    optimizer = torch.optim.Adam(params, lr=OUTER_LR)
    check = first_meta_gradient(params, lambda: meta_grad(split[0]))
    return Bench(outer_step(meta_grad, optimizer, split), workload.meta_batch, check)


def fewshot_learner(
    workload: Workload,
    method: str,
    model: nn.Module,
    loss_fn: LossFn,
    inner_lr: float,
    vectorize: bool,
    chunk_size: int | None,
    checkpoint_inner: bool = False,
) -> fewshot.GradientLearner:
    """fewshot's `method` around `model` (ANIL: around Conv4's body and head; MAML++ with every
    fix but DA, whose first-order phase would not compare with second-order MAML, and, for
    "maml++-last-step", without MSL's per-step query losses, as after its epochs)."""
    settings = dict(
        inner_lr=inner_lr,
        inner_steps=workload.inner_steps,
        first_order=workload.first_order,
        loss=loss_fn,
        vectorize=vectorize,
        chunk_size=chunk_size,
        checkpoint_inner=checkpoint_inner,
    )
    if method == "anil":
        return fewshot.ANIL(*body_and_head(model), **settings)
    if method.startswith("maml++"):
        return fewshot.MAMLpp(model, da=False, msl=method == "maml++", **settings)
    methods = {"maml": fewshot.MAML, "meta-sgd": fewshot.MetaSGD}
    return methods[method](model, **settings)


def backward(loss: torch.Tensor) -> torch.Tensor:
    """`loss.backward()`, returning the detached loss."""
    loss.backward()
    return loss.detach()


def maml_setting(workload: Workload) -> tuple[nn.Module, LossFn, float]:
    """The paper's network (fresh weights from the global seed), loss and inner step size."""
    if workload.kind == "sinusoid":
        return fewshot.SinusoidMLP(), F.mse_loss, 0.01
    if workload.kind == "resnet12-maml":  # Finn et al.'s miniImageNet step size
        return ResNet12(3, workload.ways), F.cross_entropy, 0.01
    return fewshot.Conv4(out_features=workload.ways), F.cross_entropy, 0.4


def per_task_flops(workload: Workload, tasks: Task) -> int:
    """FLOPs of one meta-gradient computed one task at a time, counted by FlopCounterMode.

    This is the work the algorithm needs whatever the library (what a per-task autograd loop
    executes); a vectorised implementation may execute more or less. It is the common
    numerator for every library's achieved FLOP/s. Matmuls and convolutions are counted,
    forward and every backward pass (second order included); elementwise ops are not.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model, loss_fn, inner_lr = maml_setting(workload)
    learner = fewshot_learner(
        workload, workload.method, model.to(tasks.support_x.device), loss_fn, inner_lr, False, None
    )
    with FlopCounterMode(display=False) as counter:
        learner.meta_loss(tasks).backward()
    return int(counter.get_total_flops())


def learn2learn_maml(
    model: nn.Module, loss_fn: LossFn, inner_lr: float, workload: Workload
) -> tuple[MetaGrad, list[nn.Parameter]]:
    """learn2learn's MAML (or MetaSGD) as its examples use it: clone, adapt, query loss,
    backward, per task. MetaSGD's learned step sizes start at `inner_lr` and are among the
    parameters the outer step updates."""
    import learn2learn as l2l

    wrappers = {"maml": l2l.algorithms.MAML, "meta-sgd": l2l.algorithms.MetaSGD}
    if workload.kind == "resnet12-maml":
        model = learn2learn_resnet12(model)
    maml = wrappers[workload.method](model, lr=inner_lr, first_order=workload.first_order)
    return learn2learn_loop(maml, nn.Identity(), loss_fn, workload), list(maml.parameters())


def learn2learn_resnet12(model: ResNet12) -> nn.Module:
    """learn2learn's own ResNet-12 (`l2l.vision.models.ResNet12`, DropBlock off) holding
    fewshot's ResNet-12 weights: the same parameters in the same order, so the same
    computation check also compares the two architectures."""
    from learn2learn.vision.models import ResNet12 as L2LResNet12

    width = model.embedding_size
    theirs = L2LResNet12(
        model.head.out_features, width, avg_pool=True, wider=width == 640, dropblock_dropout=0.0
    ).to(next(model.parameters()).device)
    with torch.no_grad():
        for mine, their in zip(model.parameters(), theirs.parameters(), strict=True):
            their.copy_(mine)
    return theirs


def learn2learn_anil(
    model: nn.Module, loss_fn: LossFn, inner_lr: float, workload: Workload
) -> tuple[MetaGrad, list[nn.Parameter]]:
    """learn2learn's ANIL recipe (its anil examples): the body's features computed once per
    task, before the inner loop, and `l2l.algorithms.MAML` around the head only; per task
    `clone()`, `adapt()` on the support features, query loss, backward. The Adam outer step
    covers body and head.

    Support and query sets go through the body separately, each as one batch, which is how
    fewshot's ANIL (and every MAML row here) normalises them; learn2learn's example passes a
    task's support and queries through as one batch, whose batch-norm statistics would differ.
    """
    import learn2learn as l2l

    body, head_module = body_and_head(model)
    head = l2l.algorithms.MAML(head_module, lr=inner_lr, first_order=workload.first_order)
    meta_grad = learn2learn_loop(head, body, loss_fn, workload)
    return meta_grad, [*body.parameters(), *head.parameters()]


def learn2learn_loop(
    wrapper: nn.Module, features: nn.Module, loss_fn: LossFn, workload: Workload
) -> MetaGrad:
    """learn2learn's per-task recipe around `wrapper` (its MAML or MetaSGD): the support and
    query sets through `features` (each one batch), then `clone()`, `adapt()` on the support
    loss for each inner step, query loss divided by the meta-batch, `backward()`."""

    def meta_grad(tasks: PerTask) -> torch.Tensor:
        total = None
        for support_x, support_y, query_x, query_y in tasks:
            support, query = features(support_x), features(query_x)
            learner = wrapper.clone()
            for _ in range(workload.inner_steps):
                learner.adapt(loss_fn(learner(support), support_y))
            loss = loss_fn(learner(query), query_y) / len(tasks)
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    return meta_grad


def higher_maml(
    model: nn.Module, loss_fn: LossFn, inner_lr: float, workload: Workload
) -> tuple[MetaGrad, list[nn.Parameter]]:
    """higher's `innerloop_ctx` around an SGD inner optimiser, one context per task.

    Second order backpropagates through the unrolled inner loop. First order runs the inner
    loop with `track_higher_grads=False` (no graph through the updates) and adds the query
    gradient at the adapted weights to theta's gradient, which is FOMAML's meta-gradient.
    """
    import higher

    params = list(model.parameters())
    inner_opt = torch.optim.SGD(params, lr=inner_lr)

    def meta_grad(tasks: PerTask) -> torch.Tensor:
        total = None
        for support_x, support_y, query_x, query_y in tasks:
            with higher.innerloop_ctx(
                model,
                inner_opt,
                copy_initial_weights=False,
                track_higher_grads=not workload.first_order,
            ) as (fmodel, diffopt):
                for _ in range(workload.inner_steps):
                    diffopt.step(loss_fn(fmodel(support_x), support_y))
                loss = loss_fn(fmodel(query_x), query_y) / len(tasks)
                if workload.first_order:
                    accumulate(params, torch.autograd.grad(loss, list(fmodel.parameters())))
                else:
                    loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    return meta_grad, params


def accumulate(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor]) -> None:
    """Add `grads` into the parameters' `.grad`, as `backward()` would."""
    for param, grad in zip(params, grads, strict=True):
        if param.grad is None:
            param.grad = grad  # a fresh tensor from autograd.grad, owned by nobody else
        else:
            param.grad.add_(grad)


def outer_step(
    meta_grad: Callable, optimizer: torch.optim.Optimizer, batches: Sequence
) -> Callable[[int], float]:
    """The peers' meta-step, shaped like fewshot's `meta_step`: zero, meta-gradient, Adam."""

    def step(i: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = meta_grad(batches[i % len(batches)])
        optimizer.step()
        return loss.item()

    return step


def first_meta_gradient(
    params: Sequence[nn.Parameter], loss_and_backward: Callable[[], torch.Tensor]
) -> dict[str, float]:
    """Loss and gradient norm of one meta-gradient from the initial weights, then cleared.

    Computed before any optimiser step, so every library's numbers should agree up to
    float32 rounding; the report compares them. On a GPU, TF32 is switched off for this one
    computation (cuDNN convolutions use it by default), since its 1e-3 rounding, amplified by
    several inner steps, would hide real differences; the timed steps keep torch's defaults.
    """
    for param in params:
        param.grad = None
    with full_float32():
        loss = float(loss_and_backward())
    norm = torch.sqrt(
        sum(param.grad.double().pow(2).sum() for param in params if param.grad is not None)
    )
    for param in params:
        param.grad = None
    return {"loss": loss, "grad_norm": float(norm)}


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Turn TF32 off for CUDA matmuls and convolutions inside the block, then restore it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- ProtoNet --------------------------------------------------------------------------------


def build_protonet(workload: Workload, library: str, device: torch.device) -> Bench:
    """One Prototypical Networks training episode per step (forward, backward, Adam).

    The baseline is a hand-written ProtoNet loss in plain torch (learn2learn has no ProtoNet
    algorithm class to compare with), on the same Conv4 encoder and the same episodes.
    """
    encoder = fewshot.Conv4(out_features=None, track_running_stats=True).to(device)
    batches = draw_tasks(workload, device)
    if library == "fewshot":
        protonet = fewshot.ProtoNet(encoder)
        optimizer = torch.optim.Adam(protonet.parameters(), lr=OUTER_LR)
        check = first_meta_gradient(
            list(protonet.parameters()), lambda: backward(protonet.meta_loss(batches[0]))
        )
        return Bench(lambda i: meta_step(protonet, optimizer, batches[i % len(batches)]), 1, check)

    def meta_grad(tasks: Task) -> torch.Tensor:
        return backward(reference_protonet_loss(encoder, tasks[0], workload.ways, workload.shots))

    params = list(encoder.parameters())
    check = first_meta_gradient(params, lambda: meta_grad(batches[0]))
    optimizer = torch.optim.Adam(params, lr=OUTER_LR)
    return Bench(outer_step(meta_grad, optimizer, batches), 1, check)


def reference_protonet_loss(encoder: nn.Module, task: Task, ways: int, shots: int) -> torch.Tensor:
    """ProtoNet's loss written out as in Snell et al.'s code, for one class-major episode.

    Support and query pass through the encoder together (shared batch statistics, as fewshot
    does); prototypes are the class means and logits the negative squared distances.
    """
    n_support = ways * shots
    z = encoder(torch.cat([task.support_x, task.query_x])).flatten(1)
    prototypes = z[:n_support].view(ways, shots, -1).mean(1)
    query = z[n_support:]
    logits = -(query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)
    return F.cross_entropy(logits, task.query_y)


# --- task sampling -----------------------------------------------------------------------------


def build_sampling(workload: Workload, library: str, device: torch.device) -> Bench:
    """Drawing Omniglot episodes as float tensors (support/query x and y) on `device`.

    fewshot's TaskSampler draws one episode per call ("fewshot") or a meta-batch of
    `SAMPLING_BATCH` per call ("fewshot-batched"); learn2learn's TaskDataset draws one per call
    from a MetaDataset over a TensorDataset of the same uint8 images, and its output is scaled
    to [0, 1] and split into support and query inside the timed step, so both end with the
    same four tensors.
    """
    images, labels = omniglot_train()
    w, k, q = workload.ways, workload.shots, workload.queries
    if library in ("fewshot", "fewshot-batched", "fewshot-per-task"):
        sampler = fewshot.TaskSampler(images, labels, w, k, q)
        generator = torch.Generator().manual_seed(SEED)
        per_call = SAMPLING_BATCH if library == "fewshot-batched" else 1
        return Bench(lambda i: sampler.sample(per_call, generator).to(device), per_call, {})

    import learn2learn as l2l
    from learn2learn.data.transforms import (
        ConsecutiveLabels,
        KShots,
        LoadData,
        NWays,
        RemapLabels,
    )

    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels))
    taskset = l2l.data.TaskDataset(
        meta,
        task_transforms=[
            NWays(meta, n=w),
            KShots(meta, k=k + q),
            LoadData(meta),
            RemapLabels(meta),
            ConsecutiveLabels(meta),
        ],
        num_tasks=-1,
    )
    support = torch.zeros(w * (k + q), dtype=torch.bool)
    for offset in range(k):  # ConsecutiveLabels leaves each class's k + q examples together
        support[torch.arange(w) * (k + q) + offset] = True

    def step(i: int) -> Task:
        x, y = taskset.sample()
        x = x.float().div_(255.0)
        return Task(x[support], y[support], x[~support], y[~support]).to(device)

    return Bench(step, 1, {})


# --- matmul ----------------------------------------------------------------------------------


def build_matmul(workload: Workload, library: str, device: torch.device) -> Bench:
    """A square float32 matmul: the machine's attainable FLOP/s, to put the others in scale."""
    n = MATMUL_SIZE[device.type]
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    return Bench(lambda i: torch.mm(a, b, out=out), 1, {}, flops_per_step=2 * n**3)
