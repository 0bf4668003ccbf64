"""Meta-training over several processes with torch.distributed, as `torchrun` launches it.

Each process (rank) draws its share of every meta-batch from its own random stream and runs
the method's `training_step` on it; then one all-reduce of one flat buffer averages, across
ranks, every parameter's gradient, the floating-point buffers (batch norm's running
statistics) and the step's metrics. With equal shares, the mean of the ranks' mean gradients
is the mean gradient over the whole meta-batch, so N processes with B/N tasks each take the
same outer step as one process with B tasks.

DistributedDataParallel is not used: it averages gradients from hooks on a module's forward
and backward, but a meta-learner calls its network functionally on adapted weights
(`torch.func.functional_call`), through which those hooks never see the outer parameters, and
its chunked backward would all-reduce once per chunk. Averaging once, after the method's
whole backward, serves every method alike, Reptile's outer update included.

Decisions that end a run are agreed: a non-finite loss on one rank makes the averaged loss
non-finite on all; stop requests and time limits are combined by a second, two-value
all-reduce. Rank 0 alone validates, logs and writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fewshot.backbones import FrozenBatchNorm
from fewshot.devices import accelerator_count
from fewshot.errors import ConfigError, FewshotError


class PeerFailed(FewshotError):
    """Another process of a distributed run failed, so this one cannot go on."""


# How long a collective waits for the other processes; rank 0 validates while the others wait
# at the next checkpoint, so this bounds a validation's length, not a training step's.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# How long the other processes wait for rank 0 to download a dataset or decode its cache (an
# hour for tieredImageNet's first run here).
PREPARATION_TIMEOUT = datetime.timedelta(hours=12)
# Words of the errors a collective raises when another process has gone (gloo raises some as
# plain RuntimeErrors).
PEER_GONE = ("Connection closed", "Connection reset", "Broken pipe", "timed out", "Timed out")


@dataclass(frozen=True)
class World:
    """This process's place in a run: rank `rank` of `size` processes, `local_rank` on its
    machine, computing on `device` (a 1-process run is rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process validates, logs and writes the run folder."""
        return self.rank == 0

    def stream(self, purpose: str) -> str:
        """The random stream of `purpose` for this rank: rank 0 keeps the 1-process stream,
        so that one process is rank 0 alone; rank r > 0 draws from a stream of its own."""
        return purpose if self.rank == 0 else f"{purpose}/rank{self.rank}"

    def seed(self, seed: int) -> int:
        """This rank's seed for the global generators (dropout, augmentation)."""
        return seed if self.rank == 0 else seed + 1_000_003 * self.rank

    def share(self, meta_batch: int) -> int:
        """This rank's tasks (or examples) of a meta-batch of `meta_batch`: as equal as they
        can be, the first `meta_batch % size` ranks taking one more (25 over 2: 13 and 12).
        `average_step` weighs each rank's gradient by its share."""
        if meta_batch < self.size:
            raise ConfigError(
                f"a meta-batch of {meta_batch} leaves some of the {self.size} processes without "
                f"a task; use a `meta_batch` of at least {self.size}."
            )
        return meta_batch // self.size + (self.rank < meta_batch % self.size)


SINGLE_PROCESS = World()


def environment_world() -> World:
    """The world this process is in: the process group already joined, if any (e.g. by a
    script of your own), else the one torchrun (or any launcher setting RANK and WORLD_SIZE)
    describes."""
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    if size <= 1:
        return SINGLE_PROCESS
    return World(rank, size, int(os.environ.get("LOCAL_RANK", rank)))


def rank_device(world: World, device: str) -> str:
    """The device of this rank: each process of a CUDA run takes the GPU of its local rank."""
    kind = torch.device(device)
    if not world.is_distributed or kind.type == "cpu":
        return device
    if kind.type != "cuda":
        raise ConfigError(
            f"`device={device}`: a run of several processes trains on CPUs (gloo) or CUDA GPUs "
            "(nccl); give `device` cpu or cuda."
        )
    if kind.index is not None:
        raise ConfigError(
            f"`device={device}` names one GPU, but each of the {world.size} processes needs its "
            f"own; give `device={kind.type}` (each process takes the GPU of its LOCAL_RANK)."
        )
    if world.local_rank >= accelerator_count(kind.type):
        raise ConfigError(
            f"process {world.rank} would take GPU {world.local_rank}, but this machine has "
            f"{accelerator_count(kind.type)}; start at most that many processes per machine "
            "(--nproc-per-node)."
        )
    return f"{kind.type}:{world.local_rank}"


def backend_for(device: str) -> str:
    """nccl between GPUs, gloo between CPUs."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: str) -> Iterator[World]:
    """Join the process group of a distributed launch for the duration (nothing to join for one
    process); yields this process's world, with the device it computes on."""
    world = environment_world()
    world = replace(world, device=rank_device(world, device))
    if not world.is_distributed or dist.is_initialized():
        yield world
        return
    if torch.device(world.device).type == "cuda":
        torch.cuda.set_device(world.device)
    dist.init_process_group(backend_for(world.device), timeout=COLLECTIVE_TIMEOUT)
    try:
        yield world
        # A process that tears down its connections while another is still in its last
        # collective aborts that one ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(world: World) -> Iterator[None]:
    """Turn the error a collective raises when another rank has died into one line."""
    try:
        yield
    except RuntimeError as error:
        if not world.is_distributed or not from_another_process(error):
            raise
        raise PeerFailed(
            f"process {world.rank} of {world.size}: another process of this run stopped "
            f"(its message is above), so this one stops too ({backend_reason(error)})."
        ) from None


def from_another_process(error: RuntimeError) -> bool:
    """Whether a collective's error says that another process is gone (or silent too long),
    rather than that this one failed (out of memory, a tensor on the wrong device)."""
    return isinstance(error, dist.DistError) or any(words in str(error) for words in PEER_GONE)


def backend_reason(error: Exception) -> str:
    """The gist of a collective's error: "Connection closed by peer [127.0.0.1]:19177" out of
    gloo's "[path/pair.cc:553] Connection closed by peer [127.0.0.1]:19177. This is ..."."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]


def main_first(world: World) -> contextlib.AbstractContextManager:
    """Rank 0 runs the block first (downloads, decoding caches), then the others."""

    @contextlib.contextmanager
    def ordered() -> Iterator[None]:
        with collective(world):  # a group whose barrier outwaits a long first decode
            group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
        if not world.is_main:
            barrier(world, group)
        yield
        if world.is_main:
            barrier(world, group)

    return ordered() if world.is_distributed else contextlib.nullcontext()


def barrier(world: World, group=None) -> None:
    with collective(world):
        dist.barrier(group=group)


def broadcast_module(world: World, module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (e.g. from `--init RUN`)."""
    if not world.is_distributed:
        return
    with collective(world), torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_step(
    world: World, module: nn.Module, metrics: dict[str, float], share: int = 1
) -> dict[str, float]:
    """Average the gradients, floating-point buffers and `metrics` of one step across ranks,
    each weighted by its `share` of the meta-batch (the tasks or examples it averaged over),
    in one all-reduce (not the fixed statistics of frozen batch norm); returns the averaged
    metrics. With shares n_r of N, the gradient is
    sum_r (n_r / N) g_r: the mean over the whole meta-batch, as one process takes it.

    A parameter without a gradient on every rank keeps none (an optimizer skips it, as in one
    process); with a gradient on some ranks only, the others count zero for it.
    """
    if not world.is_distributed:
        return metrics
    parameters = [p for p in module.parameters() if p.requires_grad]
    frozen = {
        id(b) for m in module.modules() if isinstance(m, FrozenBatchNorm) for b in m.buffers()
    }
    buffers = [b for b in module.buffers() if b.is_floating_point() and id(b) not in frozen]
    names = sorted(metrics)
    reference = parameters[0] if parameters else buffers[0]
    dtype = common_dtype(parameters + buffers)
    parts = [
        p.grad.to(dtype).flatten() if p.grad is not None else p.new_zeros(p.numel(), dtype=dtype)
        for p in parameters
    ]
    parts += [b.to(dtype).flatten() for b in buffers]
    parts.append(torch.tensor([p.grad is not None for p in parameters], dtype=dtype))
    parts.append(torch.tensor([metrics[name] for name in names], dtype=torch.float64).to(dtype))
    flat = torch.cat([part.to(reference.device) for part in parts]) * share
    flat = torch.cat([flat, flat.new_tensor([share])])
    with collective(world):
        dist.all_reduce(flat)
    flat = flat[:-1] / flat[-1]  # the whole meta-batch's size, summed over the ranks
    values = flat.split([t.numel() for t in parameters + buffers] + [len(parameters), len(names)])
    with torch.no_grad():
        for p, value, present in zip(parameters, values, values[-2].tolist()):
            p.grad = value.view_as(p).to(p.dtype).clone() if present > 0 else None
        for b, value in zip(buffers, values[len(parameters) :]):
            b.copy_(value.view_as(b))
    return dict(zip(names, values[-1].tolist()))


def common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """One floating dtype that holds all of `tensors` exactly."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else torch.float64


def agree(world: World, **flags: bool) -> dict[str, bool]:
    """Each flag true on all ranks when it is true on any (a stop request, a time limit)."""
    if not world.is_distributed:
        return flags
    votes = torch.tensor([float(v) for v in flags.values()], device=world.device)
    with collective(world):
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return dict(zip(flags, (bool(v) for v in votes.tolist())))


def gather(world: World, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (small objects: random-generator states)."""
    if not world.is_distributed:
        return [value]
    values: list[Any] = [None] * world.size
    with collective(world):
        dist.all_gather_object(values, value)
    return values


def broadcast(world: World, value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not world.is_distributed:
        return value
    box = [value]
    with collective(world):
        dist.broadcast_object_list(box, src=0)
    return box[0]
