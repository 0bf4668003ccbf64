"""Pretrain, meta-train, fine-tune (P>M>F, Hu et al. 2022), measured paired on the same
episodes (docs/pretrained.md).

For each run folder given (e.g. ProtoNet from scratch and ProtoNet started from Baseline's
weights), on the meta-test episodes of the shared evaluation seed: its accuracy as trained,
and with F, the fine-tuning of its encoder on each episode's support set
(`metric.SupportFineTuning`), whose learning rate is chosen among `--lrs` on `--val-episodes`
episodes of the validation classes (never the test classes). Prints a Markdown table of
accuracy +- 95% CI per run and setting, and the paired differences (F minus none; each run
minus the first) with their 95% CI and p-values.

    FEWSHOT_DATA_ROOT=../shared/data/omniglot python benchmarks/pretrained.py RUN [RUN ...]
        [--episodes 600] [--steps 20] [--lrs 0.0001,0.001,0.01] [--val-episodes 100]
        [--json-out F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fewshot.algorithms.metric import SupportFineTuning
from fewshot.cli import TEST_SEED
from fewshot.training.evaluation import evaluate_episodes, paired_difference
from fewshot.training.factory import build_sources
from fewshot.training.loading import load_run


def scores(algorithm, sampler, episodes: int, seed: int = TEST_SEED, stream: str = "eval"):
    result, per_episode = evaluate_episodes(algorithm, sampler, episodes, seed, stream=stream)
    return result, per_episode


def chosen_lr(algorithm, config, steps: int, lrs: list[float], episodes: int) -> dict:
    """The learning rate of F with the best accuracy on the validation classes' episodes."""
    validation = build_sources(config, parts=("val",)).val
    accuracy = {}
    for lr in lrs:
        algorithm.set_support_fine_tuning(SupportFineTuning(steps, lr))
        accuracy[lr] = scores(algorithm, validation, episodes, stream="val")[0].mean
    algorithm.set_support_fine_tuning(None)
    plain = scores(algorithm, validation, episodes, stream="val")[0].mean
    return {"lr": max(accuracy, key=accuracy.__getitem__), "val": accuracy, "val_plain": plain}


def measure(run: Path, episodes: int, steps: int, lrs: list[float], val_episodes: int) -> dict:
    torch.set_num_threads(1)
    config, algorithm, sources = load_run(run)
    choice = chosen_lr(algorithm, config, steps, lrs, val_episodes)
    plain, plain_scores = scores(algorithm, sources.test, episodes)
    algorithm.set_support_fine_tuning(SupportFineTuning(steps, choice["lr"]))
    tuned, tuned_scores = scores(algorithm, sources.test, episodes)
    return {
        "run": str(run),
        "split": config.split,
        "plain": plain.to_dict(),
        "finetuned": tuned.to_dict(),
        "steps": steps,
        **choice,
        "scores": {"plain": plain_scores.tolist(), "finetuned": tuned_scores.tolist()},
    }


def pair(a: list[float], b: list[float]) -> str:
    d = paired_difference(torch.tensor(a), torch.tensor(b))
    return f"{100 * d.mean:+.2f} ± {100 * d.ci95:.2f} (p = {d.p_value:.2g})"


def table(rows: list[dict]) -> str:
    lines = [
        "| run | split | as trained | with F | F's lr (val) | F minus as trained |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        plain, tuned = row["plain"], row["finetuned"]
        lines.append(
            f"| {row['run']} | {row['split']} | {100 * plain['accuracy']:.2f} ± "
            f"{100 * plain['ci95']:.2f} | {100 * tuned['accuracy']:.2f} ± "
            f"{100 * tuned['ci95']:.2f} | {row['lr']:g} | "
            f"{pair(row['scores']['finetuned'], row['scores']['plain'])} |"
        )
    first = rows[0]
    for row in rows[1:]:
        for setting in ("plain", "finetuned"):
            lines.append(
                f"\n{row['run']} minus {first['run']} ({setting}): "
                f"{pair(row['scores'][setting], first['scores'][setting])}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lrs", default="0.0001,0.001,0.01")
    parser.add_argument("--val-episodes", type=int, default=100)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    lrs = [float(lr) for lr in args.lrs.split(",")]
    rows = [measure(run, args.episodes, args.steps, lrs, args.val_episodes) for run in args.runs]
    print(table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
