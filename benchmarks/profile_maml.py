"""Where a Conv4 second-order MAML meta-step spends its time: torch.profiler's operator table.

Profiles fewshot's `training_step` (the meta-gradient, back-propagated chunk by chunk into
`.grad`) on one meta-batch shaped like the benchmark's `omniglot-maml` workload (32 tasks,
5-way 1-shot, 1 query per class, 28x28 images; random pixels, since the time does not depend
on them), after two warm-up steps, and prints each operator's share of the profiled CPU time.
Run it like the benchmark:

    PYTHONPATH=src python benchmarks/profile_maml.py [--chunk-size 4] [--steps 3]

with the allocator settings the benchmark uses (see benchmarks/README.md) for comparable figures.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

import fewshot
from fewshot.algorithms.registry import default_chunk_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk-size", type=int, default=default_chunk_size("omniglot", 32, 10))
    parser.add_argument("--steps", type=int, default=3, help="profiled meta-steps")
    parser.add_argument("--rows", type=int, default=14, help="operators to print")
    args = parser.parse_args()

    torch.manual_seed(0)
    tasks, ways = 32, 5
    maml = fewshot.MAML(fewshot.Conv4(out_features=ways), chunk_size=args.chunk_size)
    labels = torch.arange(ways).repeat(tasks, 1)
    batch = fewshot.Task(
        torch.rand(tasks, ways, 1, 28, 28), labels, torch.rand(tasks, ways, 1, 28, 28), labels
    )
    for _ in range(2):
        maml.training_step(batch)
    with profile() as prof:
        for _ in range(args.steps):
            maml.training_step(batch)
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    print(
        f"chunk size {args.chunk_size}, {torch.get_num_threads()} threads, "
        f"{total / args.steps / 1e3:.0f} ms of operator time per meta-step"
    )
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        share = 100 * event.self_cpu_time_total / total
        print(f"{event.key:40s} {share:5.1f}%  {event.count // args.steps:5d} calls/step")


if __name__ == "__main__":
    main()
