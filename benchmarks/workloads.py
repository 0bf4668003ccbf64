"""What the benchmark measures: each workload at its paper's settings, and who runs it.

Kept free of torch so that the parent process of run.py can plan a run without importing it;
builders.py turns a workload into something to time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Workload:
    """One benchmark at its paper's settings, the libraries that run it and how long to time it.

    `kind` selects the builder; `unit` names what throughput counts; each timed repeat runs
    `steps_per_repeat` steps after `warmup` untimed ones, and the median repeat is reported.
    `count_allocations` adds one untimed step that records the peak of the memory torch
    allocates for tensors (`run.peak_allocated_mib`). `method` is the gradient-based method of
    the "sinusoid" and "omniglot-maml" kinds: "maml", "meta-sgd", "anil", "maml++" or
    "maml++-last-step" (MAML++ once MSL's epochs are over).
    """

    name: str
    title: str
    kind: str
    libraries: tuple[str, ...]
    unit: str
    warmup: int
    repeats: int
    steps_per_repeat: int
    meta_batch: int = 1
    ways: int = 5
    shots: int = 1
    queries: int = 15
    inner_steps: int = 1
    first_order: bool = False
    count_flops: bool = False
    count_allocations: bool = False
    method: str = "maml"


# Finn et al.'s code draws 2K examples per class for Omniglot, K for the inner update and K for
# the meta-update (main.py: DataGenerator(update_batch_size * 2, ...)): one query per class.
FINN_OMNIGLOT_QUERIES = 1
MAML_LIBRARIES = ("fewshot", "learn2learn", "higher")
CONV_MAML_LIBRARIES = ("fewshot", "fewshot-per-task", "learn2learn", "higher")
# Meta-SGD and ANIL: learn2learn has both (MetaSGD; ANIL as its MAML wrapper around the head).
OTHER_METHOD_LIBRARIES = ("fewshot", "learn2learn")
# No peer library has MAML++: it is timed against fewshot's own MAML on the same episodes.
MAMLPP_LIBRARIES = ("fewshot", "fewshot-maml")
# Workloads 1 and 2 of the issue; their variants below differ only where named.
SINUSOID_MAML = Workload(
    "sinusoid-maml-1step",
    "Sinusoid MAML, 2nd order, 1 inner step, 25 tasks, K=10",
    "sinusoid",
    MAML_LIBRARIES,
    "tasks",
    warmup=5,
    repeats=7,
    steps_per_repeat=20,
    meta_batch=25,
    shots=10,
    queries=10,
)
OMNIGLOT_MAML = Workload(
    "omniglot-maml",
    "Omniglot 5-way 1-shot 1-query MAML, 2nd order, 1 step, 32 tasks",
    "omniglot-maml",
    CONV_MAML_LIBRARIES,
    "tasks",
    warmup=1,
    repeats=5,
    steps_per_repeat=2,
    meta_batch=32,
    queries=FINN_OMNIGLOT_QUERIES,
    count_flops=True,
)
OMNIGLOT_MAMLPP = replace(
    OMNIGLOT_MAML,
    name="omniglot-mamlpp",
    title="Omniglot 5-way 1-shot 1-query MAML++ (MSL, BNWB, BNRS, LSLR), 2nd order, 5 steps, "
    "8 tasks",
    libraries=MAMLPP_LIBRARIES,
    method="maml++",
    meta_batch=8,
    inner_steps=5,
    steps_per_repeat=3,
    count_flops=False,
)
# Finn et al.'s miniImageNet training episodes (5-way 1-shot, 15 queries, 5 inner steps, inner
# step 0.01) on ResNet-12, second order; random 84x84 images stand in for miniImageNet.
RESNET12_MAML = Workload(
    "resnet12-maml",
    "84x84 5-way 1-shot 15-query MAML on ResNet-12, 2nd order, 5 steps, 1 task",
    "resnet12-maml",
    ("fewshot", "fewshot-checkpoint", "learn2learn"),
    "tasks",
    warmup=0,  # the same-computation check before timing is a whole untimed meta-gradient
    repeats=3,
    steps_per_repeat=1,
    meta_batch=1,
    inner_steps=5,
    count_allocations=True,
)
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "matmul",
            "float32 matmul (FLOP/s reference)",
            "matmul",
            ("torch",),
            "matmuls",
            warmup=2,
            repeats=7,
            steps_per_repeat=1,
        ),
        SINUSOID_MAML,
        replace(
            SINUSOID_MAML,
            name="sinusoid-maml-5step",
            title="Sinusoid MAML, 2nd order, 5 inner steps, 25 tasks, K=10",
            warmup=3,
            steps_per_repeat=10,
            inner_steps=5,
        ),
        OMNIGLOT_MAML,
        replace(
            OMNIGLOT_MAML,
            name="omniglot-fomaml",
            title="Omniglot 5-way 1-shot 1-query first-order MAML, 1 step, 32 tasks",
            first_order=True,
        ),
        replace(
            OMNIGLOT_MAML,
            name="omniglot-maml-5step",
            title="Omniglot 5-way 1-shot 1-query MAML, 2nd order, 5 steps, 32 tasks",
            steps_per_repeat=1,
            inner_steps=5,
        ),
        replace(
            OMNIGLOT_MAML,
            name="omniglot-metasgd",
            title="Omniglot 5-way 1-shot 1-query Meta-SGD, 2nd order, 1 step, 32 tasks",
            libraries=OTHER_METHOD_LIBRARIES,
            method="meta-sgd",
        ),
        replace(
            OMNIGLOT_MAML,
            name="omniglot-anil",
            title="Omniglot 5-way 1-shot 1-query ANIL, 2nd order, 1 step, 32 tasks",
            libraries=OTHER_METHOD_LIBRARIES,
            method="anil",
        ),
        OMNIGLOT_MAMLPP,
        replace(
            OMNIGLOT_MAMLPP,
            name="omniglot-mamlpp-last-step",
            title="Omniglot 5-way 1-shot 1-query MAML++ after MSL's epochs (last-step loss; "
            "BNWB, BNRS, LSLR), 2nd order, 5 steps, 8 tasks",
            method="maml++-last-step",
        ),
        Workload(
            "omniglot-protonet",
            "Omniglot ProtoNet training episode, 5-way 1-shot 15 queries",
            "protonet",
            ("fewshot", "reference"),
            "episodes",
            warmup=5,
            repeats=7,
            steps_per_repeat=10,
        ),
        Workload(
            "omniglot-protonet-60way",
            "Omniglot ProtoNet training episode, 60-way 1-shot 5 queries (Snell et al.)",
            "protonet",
            ("fewshot", "reference"),
            "episodes",
            warmup=2,
            repeats=5,
            steps_per_repeat=3,
            ways=60,
            queries=5,
        ),
        RESNET12_MAML,
        Workload(
            "omniglot-sampling",
            "Omniglot episode sampling, 5-way 1-shot 15 queries",
            "sampling",
            ("fewshot", "fewshot-batched", "learn2learn"),
            "episodes",
            warmup=20,
            repeats=7,
            steps_per_repeat=200,
        ),
    )
}

SAMPLING_LABELS = {"learn2learn": "learn2learn (MetaDataset + TaskDataset)"}
LIBRARY_LABELS = {
    "fewshot": "fewshot (as `fewshot train` runs it)",
    "fewshot-per-task": "fewshot, vectorize=False (per task)",
    "fewshot-checkpoint": "fewshot, checkpoint_inner=True",
    "fewshot-batched": "fewshot, 32 episodes per call",
    "fewshot-maml": "fewshot's MAML, same episodes and steps (overhead reference)",
    "learn2learn": "learn2learn (per-task loop)",
    "higher": "higher (per-task loop)",
    "reference": "reference (hand-written plain torch)",
    "torch": "torch.mm",
}


def label(workload: str, library: str) -> str:
    """How a row's library is named in the report."""
    if WORKLOADS[workload].kind == "sampling" and library in SAMPLING_LABELS:
        return SAMPLING_LABELS[library]
    return LIBRARY_LABELS.get(library, library)
