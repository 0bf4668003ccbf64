"""The `fewshot` command line: `fewshot train`, `eval`, `compare` and `methods`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path

import click
import torch

from fewshot.algorithms import METHODS
from fewshot.algorithms.base import BATCH_NORM_POLICIES
from fewshot.algorithms.registry import default_text
from fewshot.errors import ConfigError, FewshotError
from fewshot.training.checkpoint import read_config
from fewshot.training.config import DATASETS, TrainConfig
from fewshot.training.evaluation import evaluate, evaluate_episodes, paired_difference
from fewshot.training.loop import load_run, override_test_episodes, train

# glibc's malloc returns large freed blocks to the system and takes them back with fresh,
# page-faulting memory on the next step; for meta-learning's big temporaries this doubled the
# time of a second-order Conv4 step here (docs/performance.md). These settings keep the heap.
TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "10000000000",
    "MALLOC_TRIM_THRESHOLD_": "10000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}
TEST_SEED = 0
PAPER = "[default: the paper's; `fewshot methods` lists them]"


def friendly_errors(command):
    """Print a user error as one line (exit 2) unless --debug asks for the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FewshotError as error:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"{error.prefix}: {error}", err=True)
            raise SystemExit(error.exit_code) from None

    return wrapper


def method_options(command):
    """One option for every setting of every registered method, from its `Settings` field:
    the type, choices and help text come from the field; the default is the method's."""
    owners: dict[str, list[str]] = {}
    first: dict[str, tuple] = {}
    for method in METHODS.values():
        hints = typing.get_type_hints(method.settings)
        for f in fields(method.settings):
            owners.setdefault(f.name, []).append(method.name)
            first.setdefault(f.name, (f, hints[f.name]))
    for name in sorted(owners, reverse=True):
        f, hint = first[name]
        kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        flag = "--" + name.replace("_", "-")
        methods = (
            "" if len(owners[name]) == len(METHODS) else f" Methods: {', '.join(owners[name])}."
        )
        help_text = f"{f.metadata['help']}{methods} {default_text(f)}"
        if kind is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            option = click.option(
                flag,
                name,
                default=None,
                type=click.Choice(choices) if choices else kind,
                help=help_text,
            )
        command = option(command)
    return command


def evaluation_options(command):
    """The options `eval` and `compare` share: data, episodes and their shape, seed, device."""
    options = [
        click.option(
            "--data-root",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Folder with the Omniglot zips, or the folder dataset "
            "[default: $FEWSHOT_DATA_ROOT].",
        ),
        click.option("--download", is_flag=True, help="Fetch missing Omniglot zips."),
        click.option(
            "--episodes", default=600, type=click.IntRange(min=1), help="Meta-test episodes."
        ),
        click.option(
            "--inner-steps",
            default=None,
            type=click.IntRange(min=0),
            help="Adaptation steps of gradient-based methods (fine-tuning steps of the "
            "fine-tuning methods) [default: each run's own].",
        ),
        click.option(
            "--seed", default=TEST_SEED, type=int, help="Episode seed; same seed, same episodes."
        ),
        *(
            click.option(
                f"--{name}",
                default=None,
                type=click.IntRange(min=1),
                help=f"Test episodes' {what} [default: the run's].",
            )
            for name, what in (
                ("ways", "classes per episode (methods without a per-class head)"),
                ("shots", "support examples per class"),
                ("queries", "queries per class"),
            )
        ),
        click.option("--device", default="cpu", help="torch device."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def test_report(algorithm, config, sampler, episodes, seed, inner_steps, device) -> dict:
    """Meta-test results: accuracy at the evaluation steps, or MSE at 0, 1 and 10 steps."""
    eval_steps = getattr(algorithm, "eval_inner_steps", None)
    if config.dataset == "sinusoid" and inner_steps is None and eval_steps is not None:
        steps_to_report = sorted({0, 1, eval_steps})
        results = [
            evaluate(algorithm, sampler, episodes, seed, steps, device) for steps in steps_to_report
        ]
        report = results[-1].to_dict()
        report["mse_by_inner_steps"] = {str(r.inner_steps): r.mean for r in results}
        report["ci95_by_inner_steps"] = {str(r.inner_steps): r.ci95 for r in results}
        report["lines"] = [str(r) for r in results]
    else:
        result = evaluate(algorithm, sampler, episodes, seed, inner_steps, device)
        report = result.to_dict()
        report["lines"] = [str(result)]
    episode_settings = {
        "dataset": config.dataset,
        "split": config.split if config.dataset == "omniglot" else None,
        "ways": None if config.dataset == "sinusoid" else config.ways,
        "shots": config.shots,
        "queries": config.queries,
        "seed": seed,
        "algorithm": config.algorithm,
        "batch_norm": algorithm.batch_norm,
    }
    return {**report, **episode_settings}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--debug", is_flag=True, help="Show full tracebacks for user errors.")
@click.version_option(package_name="fewshot")
def main(debug: bool) -> None:
    """Meta-learning for PyTorch: meta-train a method, evaluate few-shot accuracy."""


@main.command(name="train")
@click.option(
    "--algorithm",
    default="maml",
    type=click.Choice(list(METHODS)),
    help="Meta-learning method (`fewshot methods` lists them with their settings).",
)
@click.option(
    "--dataset",
    default="sinusoid",
    type=click.Choice(DATASETS),
    help="Sinusoid regression (built in), Omniglot (the official zips), or your own image "
    "folder (--data-root with train/, val/, test/ of class folders).",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Omniglot: folder with images_background.zip and images_evaluation.zip; folder "
    "dataset: folder with train/, val/, test/ "
    "[default: $FEWSHOT_DATA_ROOT, else ~/.local/share/fewshot].",
)
@click.option(
    "--download",
    is_flag=True,
    help="Fetch missing Omniglot zips from the official address (checksum-verified).",
)
@click.option(
    "--split",
    default="vinyals",
    type=click.Choice(["vinyals", "lake"]),
    help="Omniglot class split (see docs/datasets.md).",
)
@click.option("--image-size", default=28, type=int, help="Side of the images (folder dataset).")
@click.option(
    "--channels",
    default=1,
    type=int,
    help="1: grayscale, 3: RGB (folder dataset).",
)
@click.option("--ways", default=5, type=int, help="N: classes per episode (evaluation episodes).")
@click.option("--shots", default=None, type=int, help=f"K: support examples per class {PAPER}.")
@click.option("--queries", default=None, type=int, help=f"Q: query examples per class {PAPER}.")
@click.option(
    "--train-ways",
    default=None,
    type=int,
    help=f"Classes per training episode {PAPER}, else --ways.",
)
@click.option(
    "--train-queries",
    default=None,
    type=int,
    help=f"Queries per class in training episodes {PAPER}, else --queries.",
)
@click.option(
    "--meta-batch",
    default=None,
    type=int,
    help=f"Tasks per outer update; examples per batch for the methods that pretrain on "
    f"ordinary batches (baseline, baseline++, finetune) {PAPER}.",
)
@click.option("--outer-lr", default=None, type=float, help="Outer learning rate (beta).")
@method_options
@click.option(
    "--time-limit",
    default=None,
    type=float,
    help="Stop (validating and checkpointing first) after this many minutes of training.",
)
@click.option("--iterations", default=None, type=int, help=f"Outer updates {PAPER}.")
@click.option(
    "--val-every",
    default=None,
    type=int,
    help=f"Validate (and keep the best checkpoint) every this many iterations {PAPER}.",
)
@click.option("--val-episodes", default=200, type=int, help="Episodes per validation.")
@click.option(
    "--test-episodes",
    default=600,
    type=int,
    help="Meta-test episodes evaluated at the end (0 to skip).",
)
@click.option(
    "--checkpoint-every",
    default=100,
    type=int,
    help="Write the resumable checkpoint every this many iterations.",
)
@click.option("--seed", default=0, type=int, help="Seed for initialisation and task sampling.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON file of training settings; options given here override it.",
)
@click.option(
    "--resume",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Continue the interrupted run in this folder, exactly where it stopped.",
)
@click.option("--device", default="cpu", help="torch device, e.g. cpu or cuda.")
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="CPU threads [default: 1 for sinusoid, whose tiny model runs fastest so; else all].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/latest"),
    help="Run folder to create: config.json, metrics.jsonl, model.safetensors.",
)
@friendly_errors
def train_command(
    data_root, download, test_episodes, device, threads, out, config_file, resume, **options
):
    """Meta-train a model and write a run folder with the best checkpoint.

    Ctrl-C (or SIGTERM) stops after the current iteration with a checkpoint; `--resume RUN_DIR`
    continues from it.
    """
    given = explicitly_given(options)
    if resume is not None:
        if given or config_file is not None:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(given))
            raise ConfigError(
                f"--resume continues {resume} with the settings in its config.json; drop "
                f"{flags or '--config'}."
            )
        out, config = resume, read_config(resume)
    else:
        base = read_config_file(config_file) if config_file else {}
        config = TrainConfig.from_dict({**base, **{k: options[k] for k in given}})
    resolved = config.resolved(device)
    set_threads(resolved.dataset, threads)
    algorithm, sources, best = train(
        config, out, data_root, download, device, resume=resume is not None
    )
    click.echo(f"best validation: {best}")
    if test_episodes > 0:
        report = test_report(
            algorithm, resolved, sources.test, test_episodes, TEST_SEED, None, device
        )
        for line in report["lines"]:
            click.echo(f"meta-test {line}")
    click.echo(f"run folder: {out}")


def set_threads(dataset: str, threads: int | None) -> None:
    """Small models lose more to thread synchronisation than they gain from a second core."""
    if threads or dataset == "sinusoid":
        torch.set_num_threads(threads or 1)


def explicitly_given(options: dict) -> set[str]:
    """Names of the options the user typed, as opposed to their defaults."""
    context = click.get_current_context()
    return {
        name
        for name in options
        if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }


def read_config_file(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the config file {path}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"the config file {path} must hold one JSON object of settings.")
    return values


@main.command(name="eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--batch-norm",
    default=None,
    type=click.Choice(BATCH_NORM_POLICIES),
    help="Batch-norm policy at prediction [default: the run's, which is its method's paper's].",
)
@evaluation_options
@friendly_errors
def eval_command(
    run_dir, data_root, download, episodes, inner_steps, batch_norm, seed, device, as_json, **shape
):
    """Meta-test accuracy (or MSE) ± 95% CI of RUN_DIR's best checkpoint on held-out classes."""
    config, algorithm, sources = load_run(run_dir, data_root, download, device, batch_norm, shape)
    set_threads(config.dataset, None)
    report = test_report(algorithm, config, sources.test, episodes, seed, inner_steps, device)
    lines = report.pop("lines")
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(f"{config.algorithm}, batch norm: {BATCH_NORM_NOTES[algorithm.batch_norm]}")
        for line in lines:
            click.echo(f"meta-test {line}")


@main.command(name="compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@evaluation_options
@friendly_errors
def compare_command(
    run_dirs, data_root, download, episodes, inner_steps, seed, device, as_json, **shape
):
    """Evaluate RUN_DIRS on the same test episodes; compare every pair with a paired test.

    Prints each run's accuracy (or MSE) ± 95% CI, then for each pair the mean per-episode
    difference ± its 95% CI and the p-value of a paired t-test.
    """
    if len(run_dirs) < 2:
        raise click.BadParameter("give at least two run folders", param_hint="RUN_DIRS")
    if episodes < 2:
        raise click.BadParameter("a paired test needs at least 2", param_hint="--episodes")
    configs = [read_config(run_dir) for run_dir in run_dirs]
    for config in configs:
        override_test_episodes(config, shape)
    episodes_shape = check_same_episodes(run_dirs, configs)
    loaded = [load_run(run_dir, data_root, download, device, episode=shape) for run_dir in run_dirs]
    set_threads(loaded[0][0].dataset, None)
    scores, runs = [], []
    for run_dir, (config, algorithm, sources) in zip(run_dirs, loaded):
        result, run_scores = evaluate_episodes(
            algorithm, sources.test, episodes, seed, inner_steps, device
        )
        scores.append(run_scores)
        runs.append({"run": str(run_dir), "algorithm": config.algorithm, **result.to_dict()})
    pairs = []
    for i, j in itertools.combinations(range(len(runs)), 2):
        difference = paired_difference(scores[i], scores[j])
        pairs.append({"a": runs[i]["run"], "b": runs[j]["run"], **dataclasses.asdict(difference)})
    if as_json:
        click.echo(
            json.dumps(
                {"episodes": episodes, "seed": seed, **episodes_shape, "runs": runs, "pairs": pairs}
            )
        )
        return
    metric = result.metric
    percent = metric == "accuracy"
    click.echo(f"{episodes} episodes, seed {seed}: {describe_episodes(episodes_shape)}")
    for run in runs:
        value = format_value(run[metric], run["ci95"], percent)
        click.echo(f"  {run['run']} ({run['algorithm']}): {value}")
    click.echo(f"paired differences (a - b, {metric}):")
    for pair in pairs:
        value = format_value(pair["mean"], pair["ci95"], percent, signed=True)
        click.echo(f"  {pair['a']} - {pair['b']}: {value}, paired t-test p = {pair['p_value']:.3g}")


EPISODE_FIELDS = ("dataset", "split", "image_size", "channels", "ways", "shots", "queries")


def check_same_episodes(run_dirs, configs) -> dict:
    """The test split and episode shape the runs share; a clear error when they do not."""
    shapes = [{f: getattr(config, f) for f in EPISODE_FIELDS} for config in configs]
    for run_dir, shape in zip(run_dirs[1:], shapes[1:]):
        if shape != shapes[0]:
            differ = [f for f in EPISODE_FIELDS if shape[f] != shapes[0][f]]
            raise ConfigError(
                f"{run_dirs[0]} and {run_dir} are not evaluated on the same episodes: they differ "
                f"in {', '.join(f'{f} ({shapes[0][f]} vs {shape[f]})' for f in differ)}; compare "
                "runs of one test split and episode shape."
            )
    return shapes[0]


def describe_episodes(shape: dict) -> str:
    if shape["dataset"] == "sinusoid":
        return f"sinusoid regression, K = {shape['shots']}, {shape['queries']} query points"
    split = f" ({shape['split']} split)" if shape["dataset"] == "omniglot" else ""
    return (
        f"{shape['dataset']}{split} test classes, {shape['ways']}-way {shape['shots']}-shot, "
        f"{shape['queries']} queries per class"
    )


def format_value(mean: float, ci95: float, percent: bool, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if percent:
        return f"{100 * mean:{sign}.2f}% ± {100 * ci95:.2f}%"
    return f"{mean:{sign}.4f} ± {ci95:.4f}"


BATCH_NORM_NOTES = {
    "transductive": "transductive (an episode's queries are normalised together)",
    "inductive": "inductive (no query's prediction depends on another query)",
}


@main.command(name="methods")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def methods_command(as_json):
    """List every method with its paper, batch-norm policy, settings and paper defaults."""
    listing = {name: describe_method(method) for name, method in METHODS.items()}
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    for name, entry in listing.items():
        click.echo(f"{name}  (fewshot.{entry['class']})")
        click.echo(f"  paper: {entry['paper']}")
        click.echo(f"  batch norm: {entry['batch_norm']}")
        for dataset, values in entry["defaults"].items():
            shown = ", ".join(f"{k}={v}" for k, v in values.items())
            click.echo(f"  {dataset} defaults: {shown}")
        click.echo(
            f"  settings: {', '.join('--' + k.replace('_', '-') for k in entry['settings'])}"
        )
        click.echo("")


def describe_method(method) -> dict:
    return {
        "class": method.algorithm.__name__,
        "paper": method.paper,
        "batch_norm": method.batch_norm,
        "settings": {f.name: f.metadata["help"] for f in fields(method.settings)},
        "defaults": method.defaults,
    }


def run() -> None:
    """Console entry point: restart once under the tuned allocator settings, then run `main`.

    glibc reads these variables only at start-up, hence the restart. Set any MALLOC_*_ variable
    yourself, or FEWSHOT_NO_MALLOC_TUNING=1, to keep your own settings.
    """
    environment = os.environ
    untuned = not any(key.startswith("MALLOC_") for key in environment)
    if untuned and sys.platform == "linux" and not environment.get("FEWSHOT_NO_MALLOC_TUNING"):
        with contextlib.suppress(OSError):
            os.execve(
                sys.executable,
                [sys.executable, "-m", "fewshot", *sys.argv[1:]],
                {**environment, **TUNED_MALLOC},
            )
    main(prog_name="fewshot")
