"""Score one trained run on the VALIDATION classes under other values of one of its method's
settings, on fixed and on Meta-Dataset episodes: how the docs choose a prediction-time default
(Matching Networks' similarity scale, Relation Networks' support pooling) without looking at
the test classes.

    python scripts/validation_sweep.py zoo/relationnet-omniglot-5w1s support_pooling sum mean \
        --data-root ../shared/data/omniglot --episodes 300

Each value rebuilds the method from the run's configuration with that setting, loads the run's
best weights, and evaluates on `--episodes` episodes of the validation stream (evaluation seed
0: every value sees the same episodes). Values are parsed as JSON where they parse (numbers,
true/false), else taken as text.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import torch

from fewshot.training import checkpoint
from fewshot.training.evaluation import evaluate
from fewshot.training.factory import build_algorithm, build_sources


def parsed(value: str) -> object:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("setting")
@click.argument("values", nargs=-1, required=True)
@click.option("--data-root", type=click.Path(path_type=Path), envvar="FEWSHOT_DATA_ROOT")
@click.option("--episodes", default=300, show_default=True)
@click.option("--samplers", default="fixed,meta-dataset", show_default=True)
def main(
    run_dir: Path,
    setting: str,
    values: tuple[str, ...],
    data_root: Path | None,
    episodes: int,
    samplers: str,
) -> None:
    torch.set_num_threads(1)
    config = checkpoint.read_config(run_dir)
    tensors = checkpoint.read_weights(run_dir / checkpoint.BEST_WEIGHTS)
    for sampler in samplers.split(","):
        episodes_config = dataclasses.replace(config, sampler=sampler)
        val = build_sources(episodes_config, data_root, parts=("val",)).val
        for value in map(parsed, values):
            settings = dataclasses.replace(config.settings, **{setting: value})
            algorithm = build_algorithm(dataclasses.replace(config, settings=settings))
            checkpoint.fit_weights(algorithm, tensors, run_dir / checkpoint.BEST_WEIGHTS)
            result = evaluate(algorithm, val, episodes=episodes, seed=0, stream="val")
            click.echo(f"{sampler}\t{setting}={value}\t{result}")


if __name__ == "__main__":
    main()
