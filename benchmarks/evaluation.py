"""How long the field's protocol takes per zoo model: seconds per 600 test episodes of
`fewshot eval zoo/NAME`, Omniglot 5-way 1-shot, as a user runs it (docs/performance.md).

Each model's time is that of `fewshot eval zoo/NAME --episodes 62` minus that of the same
command with `--episodes 12`, scaled to 600 episodes: the evaluator draws 25 episodes at a
time, so the difference is two whole draws of 25 (62 is 25 + 25 + 12), and process start-up,
loading and the first draw's warm-up are left out. (The before/after run of 2026-12-06 took
`--episodes 2` as the base, whose one draw still pays every step of a many-step method: its
scaled times of such methods are low.) Both commands run one after the other, in rounds; the
table shows each model's median over the rounds and its ratio to ProtoNet's, and MAML's inductive
policy against its own transductive time. Beside them, the work: each model's matmul and
convolution FLOPs per 600 episodes (counted by torch's `FlopCounterMode` on one draw of 25
episodes, forward and backward passes; elementwise work is not counted), the rate its time
makes of them, and that rate as a share of a 2048x2048 float32 matmul's, timed in this run. A
row whose time is long at a rate as high as the others' is long because of its work, not its
code. For what it times in its own process (`--step-times`, `--fine-tuning-steps`,
`--profile`), the script restarts itself once under the allocator settings `fewshot eval` runs
under (`fewshot.cli.malloc_settings`), so that those see the command line's allocator; the
table's `fewshot eval` commands choose their own.

    FEWSHOT_DATA_ROOT=../shared/data/omniglot python benchmarks/evaluation.py [--rounds 3]
        [--models NAME,...] [--before CHECKOUT] [--json-out F] [--md-out F]
    python benchmarks/evaluation.py --step-times reptile-omniglot-5w1s   # per inner step
    python benchmarks/evaluation.py --fine-tuning-steps finetune-omniglot-5w1s   # per step
    python benchmarks/evaluation.py --profile meta-lstm-omniglot-5w1s   # where the time goes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fewshot.cli import malloc_settings, restart_under
from fewshot.training.evaluation import EPISODES_PER_DRAW

REPO = Path(__file__).resolve().parents[1]
# The base run's one draw is partial, as the long run's last; between them, two whole draws.
BASE_EPISODES = 12
EPISODES = BASE_EPISODES + 2 * EPISODES_PER_DRAW
# (zoo folder, extra `fewshot eval` options, the row's name)
MODELS = [
    ("protonet-omniglot-5w1s", (), "ProtoNet"),
    ("maml-omniglot-5w1s-cpu", (), "MAML (transductive)"),
    ("maml-omniglot-5w1s-cpu", ("--batch-norm", "inductive"), "MAML, `--batch-norm inductive`"),
    ("baseline-omniglot-5w1s", (), "Baseline"),
    ("baselinepp-omniglot-5w1s", (), "Baseline++"),
    ("mamlpp-omniglot-5w1s", (), "MAML++"),
    ("matchingnet-omniglot-5w1s", (), "Matching Networks"),
    ("relationnet-omniglot-5w1s", (), "Relation Networks"),
    ("meta-sgd-omniglot-5w1s", (), "Meta-SGD"),
    ("anil-omniglot-5w1s", (), "ANIL"),
    ("reptile-omniglot-5w1s", (), "Reptile"),
    ("finetune-omniglot-5w1s", (), "fine-tune everything"),
    ("meta-lstm-omniglot-5w1s", (), "Meta-LSTM"),
]


def eval_seconds(
    name: str, options: tuple[str, ...], episodes: int, source: Path | None = None
) -> float:
    """Wall time of `fewshot eval zoo/NAME --episodes EPISODES OPTIONS` in a fresh process,
    with the package of checkout `source` (its `src`) where given, else this one's."""
    command = [sys.executable, "-m", "fewshot", "eval", str(REPO / "zoo" / name)]
    command += ["--episodes", str(episodes), *options]
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source / "src"), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    return seconds


def per_600_episodes(name: str, options: tuple[str, ...], source: Path | None = None) -> float:
    """One round: (t(EPISODES) - t(BASE_EPISODES)) / (EPISODES - BASE_EPISODES) * 600."""
    long = eval_seconds(name, options, EPISODES, source)
    short = eval_seconds(name, options, BASE_EPISODES, source)
    return (long - short) / (EPISODES - BASE_EPISODES) * 600


def measure(
    models: list[tuple[str, tuple[str, ...], str]], rounds: int, before: Path | None = None
) -> list[dict]:
    """Every model, `rounds` times, the models interleaved within a round so that the
    machine's slow spells fall on all of them alike; with `before` (an earlier checkout),
    each model with that checkout's code too, right before this one's."""
    versions = {"before": before, "median": None} if before else {"median": None}
    times = {(label, v): [] for _, _, label in models for v in versions}
    for round_ in range(rounds):
        for name, options, label in models:
            for version, source in versions.items():
                times[label, version].append(per_600_episodes(name, options, source))
                seconds = times[label, version][-1]
                which = "before" if version == "before" else "this checkout"
                print(f"round {round_ + 1}: {label} ({which}): {seconds:.0f} s", file=sys.stderr)
    rows = []
    for name, options, label in models:
        row = {"model": name, "options": list(options), "label": label}
        for version in versions:
            key = "rounds" if version == "median" else "rounds before"
            row[key] = times[label, version]
            row[version] = statistics.median(times[label, version])
        rows.append(row)
    return rows


@contextlib.contextmanager
def counted_flops(algorithm) -> Iterator[FlopCounterMode]:
    """`FlopCounterMode` around `algorithm`'s work, its tasks taken one at a time: torch's
    counter takes a grouped convolution's weight gradient for an ungrouped one (the groups
    times too many), and the vectorised paths run the tasks as groups; one task at a time is
    the same arithmetic in plain convolutions."""
    vectorize = getattr(algorithm, "vectorize", None)
    if vectorize is not None:
        algorithm.vectorize = False
    try:
        with FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        if vectorize is not None:
            algorithm.vectorize = vectorize


def gflop_per_600_episodes(name: str, options: tuple[str, ...]) -> float:
    """Matmul and convolution GFLOPs (forward and backward passes) of 600 test episodes as
    `fewshot eval zoo/NAME OPTIONS` runs them: one draw's, counted, scaled."""
    from fewshot.training.evaluation import evaluate_episodes
    from fewshot.training.loading import load_run

    batch_norm = options[options.index("--batch-norm") + 1] if "--batch-norm" in options else None
    _, algorithm, sources = load_run(REPO / "zoo" / name, batch_norm=batch_norm)
    with counted_flops(algorithm) as counter:
        evaluate_episodes(algorithm, sources.test, EPISODES_PER_DRAW)
    return counter.get_total_flops() / EPISODES_PER_DRAW * 600 / 1e9


def matmul_gflops(repeats: int = 21) -> float:
    """GFLOP/s of a 2048x2048 float32 matmul on this machine now (median of `repeats`): the
    rate the other rows are put in scale of (`run.py`'s reference)."""
    from builders import build_matmul
    from workloads import WORKLOADS

    bench = build_matmul(WORKLOADS["matmul"], "torch", torch.device("cpu"))
    seconds = []
    for i in range(repeats + 2):  # two warm-up calls
        started = time.perf_counter()
        bench.step(i)
        seconds.append(time.perf_counter() - started)
    return cast(int, bench.flops_per_step) / statistics.median(seconds[2:]) / 1e9


def step_work(algorithm, batch, steps: int, seconds: float, how: str) -> str:
    """A step's GFLOPs on `batch` and the rate `seconds` a step makes of them, taken `how`."""
    gflop = adaptation_gflop_per_step(algorithm, batch, steps)
    return f"{gflop:.2f} GFLOP a step, {how} {rate(gflop, seconds, matmul_gflops())}"


def adaptation_gflop_per_step(algorithm, batch, steps: int) -> float:
    """Matmul and convolution GFLOPs of one adaptation step to `batch`'s support sets, as the
    evaluator takes it."""
    from fewshot.training.evaluation import prediction_mode

    with prediction_mode(algorithm, 0), counted_flops(algorithm) as counter:
        algorithm.adapt_tasks(batch.support_x, batch.support_y)
    return counter.get_total_flops() / steps / 1e9


def rate(gflop: float, seconds: float, matmul: float) -> str:
    """`gflop` done in `seconds` as GFLOP/s and as a share of the matmul's `matmul` GFLOP/s."""
    return f"{gflop / seconds:.0f} GFLOP/s, {gflop / seconds / matmul:.0%} of the matmul's"


def first_draw(name: str):
    """A zoo model, loaded as `fewshot eval` loads it, and the first draw of its test episodes
    (the evaluator's seed and stream), with the steps its adaptation takes on them."""
    from fewshot.tasks import stream_generator
    from fewshot.training.loading import load_run

    _, algorithm, sources = load_run(REPO / "zoo" / name)
    batch = sources.test.sample(EPISODES_PER_DRAW, stream_generator("eval", 0))
    return algorithm, batch, algorithm.evaluation_steps(batch.support_x.shape[1])


def adaptation_seconds(algorithm, batch, steps: int) -> float:
    """Seconds per step of adapting to `batch`'s support sets as the evaluator does."""
    from fewshot.training.evaluation import prediction_mode

    with prediction_mode(algorithm, 0):
        started = time.perf_counter()
        algorithm.adapt_tasks(batch.support_x, batch.support_y)
        return (time.perf_counter() - started) / steps


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def inner_step_seconds(name: str, rounds: int = 3) -> str:
    """Seconds per inner step of a zoo gradient model on one draw of 25 test episodes' support
    sets: adapting them as the evaluator does (eval mode, `prediction_mode`), and taking the
    same steps on the same support sets as its training does (train mode, gradients on, no
    graph kept across steps); medians of `rounds`. Where the two agree, a method's evaluation
    costs what its steps cost: the time is in the number of steps, not in the test path."""
    algorithm, batch, steps = first_draw(name)
    if algorithm.training_data == "examples":
        raise SystemExit(f"{name}: its training is pretraining on batches, not inner steps")
    times: dict[str, list[float]] = {"test": [], "training": []}
    for _ in range(rounds):
        times["test"].append(adaptation_seconds(algorithm, batch, steps))
        algorithm.train()
        with torch.enable_grad():
            started = time.perf_counter()
            algorithm.trajectory(batch.support_x, batch.support_y, steps, False)
            times["training"].append((time.perf_counter() - started) / steps)
    t = medians(times)
    return (
        f"{name}: {steps} steps; per inner step {1000 * t['test']:.1f} ms at test, "
        f"{1000 * t['training']:.1f} ms in training (25 support sets, median of {rounds}); "
        + step_work(algorithm, batch, steps, t["test"], "at test")
    )


def fine_tuning_step_seconds(name: str, rounds: int = 3) -> str:
    """Seconds per fine-tuning step of a zoo fine-tuning model on one draw of 25 test episodes,
    the steps of its recipe (mini-batches of the support set): as the evaluator takes them (the
    25 episodes' networks vectorised), one episode's network at a time (the same steps, not
    vectorised), and as one network taking a step on all 25 mini-batches at once (a
    pretraining step on the same images: what a step costs without 25 networks); medians of
    `rounds`."""
    algorithm, batch, steps = first_draw(name)
    network = copy.deepcopy(algorithm.model).eval()  # body and head, running statistics
    optimizer = torch.optim.SGD(
        network.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3
    )
    # The recipe's mini-batches of a 5-example support set: 4 examples, then 1.
    sizes = [4, 1] * (steps // 2)
    times: dict[str, list[float]] = {"vectorised": [], "one at a time": [], "one network": []}
    for _ in range(rounds):
        for label, vectorize in (("vectorised", True), ("one at a time", False)):
            algorithm.vectorize = vectorize
            times[label].append(adaptation_seconds(algorithm, batch, steps))
        algorithm.vectorize = True
        started = time.perf_counter()
        for size in sizes:
            x = batch.support_x[:, :size].flatten(0, 1)
            y = batch.support_y[:, :size].flatten(0, 1)
            optimizer.zero_grad()
            F.cross_entropy(network(x), y).backward()
            optimizer.step()
        times["one network"].append((time.perf_counter() - started) / len(sizes))
    t = medians(times)
    return (
        f"{name}: {steps} steps of 25 episodes; per step {1000 * t['vectorised']:.1f} ms "
        f"vectorised, {1000 * t['one at a time']:.1f} ms one episode at a time, "
        f"{1000 * t['one network']:.1f} ms as one network on the same images (median of "
        f"{rounds}); " + step_work(algorithm, batch, steps, t["vectorised"], "vectorised")
    )


def profile(name: str, rows: int = 15) -> str:
    """Where one draw of 25 test episodes of a zoo model spends its time: `torch.profiler`'s
    operators by their own CPU time (after one unprofiled draw), as a table."""
    from torch.profiler import profile as profiled

    from fewshot.training.evaluation import evaluate_episodes
    from fewshot.training.loading import load_run

    _, algorithm, sources = load_run(REPO / "zoo" / name)
    evaluate_episodes(algorithm, sources.test, EPISODES_PER_DRAW)
    with profiled() as run:
        evaluate_episodes(algorithm, sources.test, EPISODES_PER_DRAW)
    averages = run.key_averages()
    total = sum(event.self_cpu_time_total for event in averages)
    lines = [f"{name}: one draw of {EPISODES_PER_DRAW} episodes, {total / 1e6:.2f} s of CPU time"]
    for event in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:rows]:
        share = event.self_cpu_time_total / total
        lines.append(f"  {event.key:<40} {share:6.1%}  {event.count:7d} calls")
    return "\n".join(lines)


def commit(checkout: Path) -> str:
    """The checkout's commit, short, with "+" where its files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain") else "")


def table(rows: list[dict], matmul: float) -> str:
    """The markdown table: each version's seconds, ratios and rounds, then the work (GFLOP per
    600 episodes) and the rate this checkout's time makes of it (`matmul`: the reference's
    GFLOP/s)."""
    by_label = {row["label"]: row for row in rows}
    versions = ["before", "median"] if "before" in rows[0] else ["median"]
    header = "| zoo model |"
    for version in versions:
        when = " before" if version == "before" else (" after" if len(versions) > 1 else "")
        header += f" s / 600 episodes{when} | x ProtoNet | rounds (s) |"
    header += " GFLOP / 600 episodes | GFLOP/s (share of the matmul's) |"
    lines = [header, "|---" * (3 + 3 * len(versions)) + "|"]
    for row in rows:
        line = f"| {row['label']} |"
        for version in versions:
            protonet = by_label.get("ProtoNet", {}).get(version)
            transductive = by_label.get("MAML (transductive)", {}).get(version)
            ratio = f"{row[version] / protonet:.1f}" if protonet else "—"
            if row["options"] == ["--batch-norm", "inductive"] and transductive:
                ratio += f" ({row[version] / transductive:.1f}x its transductive)"
            key = "rounds before" if version == "before" else "rounds"
            rounds = ", ".join(f"{t:.0f}" for t in row[key])
            line += f" {row[version]:.0f} | {ratio} | {rounds} |"
        achieved = row["gflop"] / row["median"]
        line += f" {row['gflop']:,.0f} | {achieved:.0f} ({achieved / matmul:.0%}) |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", type=lambda s: s.split(","), help="zoo folders, a subset")
    parser.add_argument(
        "--json-out", type=Path, default=REPO / "benchmarks/results-evaluation.json"
    )
    parser.add_argument("--md-out", type=Path, default=REPO / "benchmarks/results-evaluation.md")
    parser.add_argument(
        "--step-times",
        type=lambda s: s.split(","),
        help="zoo gradient models: seconds per inner step at test and in training, same batch",
    )
    parser.add_argument(
        "--fine-tuning-steps",
        type=lambda s: s.split(","),
        help="zoo fine-tuning models: seconds per fine-tuning step, vectorised, one episode at "
        "a time, and one network on the same images",
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of an earlier commit: each model is timed with its code too, "
        "interleaved (before and after columns)",
    )
    parser.add_argument(
        "--profile",
        type=lambda s: s.split(","),
        help="zoo models: where one draw of 25 test episodes spends its time (torch.profiler)",
    )
    args = parser.parse_args()
    settings = malloc_settings(["eval"], os.environ)  # `fewshot eval`'s allocator
    if settings and (args.profile or args.fine_tuning_steps or args.step_times):
        restart_under(settings, sys.orig_argv)
    reports = (
        (args.profile, lambda name: profile(name)),
        (args.fine_tuning_steps, lambda name: fine_tuning_step_seconds(name, args.rounds)),
        (args.step_times, lambda name: inner_step_seconds(name, args.rounds)),
    )
    for names, report in reports:
        if names:
            for name in names:
                print(report(name))
            return
    models = [m for m in MODELS if args.models is None or m[0] in args.models]
    matmul = [matmul_gflops()]
    rows = measure(models, args.rounds, args.before)
    matmul.append(matmul_gflops())
    for row in rows:
        row["gflop"] = gflop_per_600_episodes(row["model"], tuple(row["options"]))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    header = (
        f"`fewshot eval zoo/NAME`, Omniglot 5-way 1-shot: seconds per 600 episodes, "
        f"(t({EPISODES}) - t({BASE_EPISODES})) x 600 / {EPISODES - BASE_EPISODES}, median of "
        f"{args.rounds} rounds; {machine}; {time.strftime('%Y-%m-%d')}"
    )
    if args.before is not None:
        header += f"; before: commit {commit(args.before)}, after: commit {commit(REPO)}"
    header += (
        f". GFLOP: matmuls and convolutions, forward and backward, of one draw of "
        f"{EPISODES_PER_DRAW} episodes (`FlopCounterMode`) x {600 // EPISODES_PER_DRAW}; the "
        f"reference, a 2048x2048 float32 matmul, ran at "
        f"{matmul[0]:.0f} GFLOP/s before the rounds and {matmul[1]:.0f} after (their mean is "
        f"the share's 100%).\n\n"
    )
    markdown = header + table(rows, statistics.mean(matmul)) + "\n"
    args.md_out.write_text(markdown)
    result = {"machine": machine, "matmul_gflops": matmul, "rows": rows}
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
