"""Run by torchrun from test_distributed.py: for every registered method, one outer step over 2
processes (each on its share of a meta-batch of 5: 3 tasks and 2, an uneven split) must equal
one step of a single process on the whole meta-batch, computed here by every process on its
own. Each process checks; process 0 prints "same step: METHOD" for each (a failed check on
either ends the job with an error).

Methods trained on batches of examples normalise batch norm over each process's share of the
batch (as DistributedDataParallel without SyncBatchNorm does), so for them the single-process
step is the mean of the shares' gradients, each computed alone and weighted by its size."""

from __future__ import annotations

import copy
import sys

import torch

from fewshot.algorithms import METHODS, get_method
from fewshot.tasks import Batch, ExampleSampler, Task, TaskSampler
from fewshot.training.config import TrainConfig
from fewshot.training.distributed import agree, process_group
from fewshot.training.factory import build_algorithm
from fewshot.training.loop import NonFiniteError, meta_step

META_BATCH = 5  # over 2 processes: 3 and 2
CLASSES, PER_CLASS = 12, 6


def shares(whole, size: int):
    """The meta-batch cut as the ranks share it: the first META_BATCH % size take one more."""
    sizes = [META_BATCH // size + (r < META_BATCH % size) for r in range(size)]
    ends = [sum(sizes[: r + 1]) for r in range(size)]
    cuts = [(end - n, end) for n, end in zip(sizes, ends)]
    if isinstance(whole, Task):
        return [whole[a:b] for a, b in cuts]
    return [Batch(whole.x[a:b], whole.y[a:b]) for a, b in cuts]


def step_on_shares_alone(algorithm, parts) -> None:
    """theta <- theta - sum over parts of (part size / META_BATCH) x the part's gradient."""
    total = [torch.zeros_like(p) for p in algorithm.parameters()]
    for part in parts:
        algorithm.zero_grad()
        algorithm.training_step(part)
        for sum_, p in zip(total, algorithm.parameters()):
            if p.grad is not None:
                sum_ += p.grad * len(part) / META_BATCH
    with torch.no_grad():
        for p, g in zip(algorithm.parameters(), total):
            p -= g


def say(world, line: str) -> None:
    """Print from process 0 alone: two processes' lines would interleave on one pipe."""
    if world.is_main:
        print(line, flush=True)


def main() -> int:
    with process_group("cpu") as world:
        images = torch.randint(0, 256, (CLASSES * PER_CLASS, 1, 28, 28), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
        labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
        for name in METHODS:
            config = TrainConfig(
                algorithm=name, dataset="omniglot", ways=3, shots=1, queries=2, train_ways=3,
                train_queries=2, meta_batch=META_BATCH,
            ).resolved()  # fmt: skip
            if hasattr(config.settings, "chunk_size"):
                # One task a vectorised pass on both sides, so that no task's arithmetic depends
                # on how the meta-batch was cut: a 4 + 1 chunking alone against 3 and 2 over the
                # processes rounds differently, which Reptile's Adam steps amplify past 2e-5.
                config.settings.chunk_size = 1
            examples = get_method(name).algorithm.training_data == "examples"
            sampler = (
                ExampleSampler(images, labels)
                if examples
                else TaskSampler(images, labels, ways=3, shots=1, queries=2)
            )
            config.settings = config.settings.fit_data(sampler)
            whole = sampler.sample(META_BATCH, torch.Generator().manual_seed(1))
            torch.manual_seed(0)
            alone = build_algorithm(config)
            together = copy.deepcopy(alone)
            if examples:
                step_on_shares_alone(alone, shares(whole, world.size))
            else:
                meta_step(alone, torch.optim.SGD(alone.parameters(), lr=1.0), whole)
            own = shares(whole, world.size)[world.rank]
            assert len(own) == world.share(META_BATCH)
            meta_step(together, torch.optim.SGD(together.parameters(), lr=1.0), own, world=world)
            for (key, a), b in zip(alone.named_parameters(), together.parameters()):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=f"{name}: {key}")
            say(world, f"same step: {name}")
        check_agreements(world, images, labels)
    return 0


def check_agreements(world, images, labels) -> None:
    """What one process decides, both do: a stop request, and refusing a non-finite step."""
    agreed = agree(world, stop=world.rank == 1, out_of_time=False)
    assert agreed == {"stop": True, "out_of_time": False}, agreed
    say(world, "agreed: a stop request on one process stops both")
    config = TrainConfig(dataset="omniglot", ways=3, shots=1, queries=2, meta_batch=2).resolved()
    algorithm = build_algorithm(config)
    tasks = TaskSampler(images, labels, ways=3, shots=1, queries=2).sample(1)
    if world.rank == 1:
        tasks = Task(tasks.support_x * float("nan"), *tasks.tensors()[1:])
    before = [p.detach().clone() for p in algorithm.parameters()]
    try:
        meta_step(algorithm, torch.optim.SGD(algorithm.parameters(), lr=1.0), tasks, world=world)
    except NonFiniteError:
        assert all(torch.equal(a, b) for a, b in zip(before, algorithm.parameters()))
        say(world, "agreed: a non-finite loss on one process stops both")
    else:
        raise AssertionError("a non-finite loss on process 1 did not stop process 0's step")


if __name__ == "__main__":
    sys.exit(main())
