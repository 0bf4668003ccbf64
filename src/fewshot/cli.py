"""The `fewshot` command line: `fewshot train`, `tune`, `eval`, `compare`, `adapt`, `plot` and
`methods`."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import itertools
import json
import os
import re
import sys
import time
import typing
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path

import click
import torch

from fewshot.algorithms import METHODS
from fewshot.algorithms.base import BATCH_NORM_POLICIES
from fewshot.algorithms.metric import SupportFineTuning
from fewshot.algorithms.registry import default_text
from fewshot.backbones import FREEZE_KEYWORDS
from fewshot.datasets.images import image_files
from fewshot.datasets.preprocessing import INVERT_CHOICES
from fewshot.datasets.registry import DATASETS, get_dataset
from fewshot.devices import AUTO, resolve_device
from fewshot.errors import (
    ConfigError,
    DataError,
    DivergenceError,
    FewshotError,
    NothingToDo,
    RunStopped,
)
from fewshot.files import atomic_write_text
from fewshot.progress import format_table
from fewshot.training.checkpoint import read_config
from fewshot.training.config import SAMPLERS, TrainConfig, applies, check_episode_settings
from fewshot.training.distributed import environment_world
from fewshot.training.evaluation import (
    evaluate_episodes,
    paired_difference,
    prediction_mode,
    test_report,
)
from fewshot.training.loading import load, load_run, override_test_episodes
from fewshot.training.loop import train, trained_iterations
from fewshot.training.tensorboard import TensorBoardLogger

# glibc's malloc returns large freed blocks to the system and takes them back with fresh,
# page-faulting memory on the next step; for meta-learning's big temporaries this doubled the
# time of a second-order Conv4 step here (docs/performance.md). These settings keep the heap.
TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "10000000000",
    "MALLOC_TRIM_THRESHOLD_": "10000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}
# For --checkpoint-inner, whose point is memory: fixed thresholds (blocks from 6 MiB mapped and
# returned at once, the heap's top returned past 64 MiB) instead of glibc's moving ones, under
# which blocks of up to 32 MiB land in the heap, where longer-lived neighbours keep freed memory
# from going back. A mapped block is faulted in afresh at each allocation, so torch's allocator
# asks for transparent huge pages (THP_MEM_ALLOC_ENABLE: madvise on blocks from 2 MiB), one
# fault per 2 MiB instead of per 4 KiB. docs/performance.md has the figures.
LEAN_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "6291456",
    "MALLOC_TRIM_THRESHOLD_": "67108864",
    "THP_MEM_ALLOC_ENABLE": "1",
}
TEST_SEED = 0
PAPER = "[default: the paper's; `fewshot methods` lists them]"


PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")  # `name` or `name=value`


def in_flags(text: str) -> str:
    """A library message or help text in the command line's words: each `name` or
    `name=value` becomes --name, --name value, or --no-name for `name=False` (the convention
    of `fewshot.errors`: backquotes around one word name a parameter)."""

    def flag(match: re.Match) -> str:
        name, value = match.groups()
        option = name.replace("_", "-")
        if value in (None, "True"):
            return f"--{option}"
        if value == "False":
            return f"--no-{option}"
        unquoted = value.strip("\"'")
        return f"--{option} {unquoted}"

    return PARAMETER.sub(flag, text)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Print a user error as one line (exit 2) unless --debug asks for the traceback."""
    try:
        yield
    except FewshotError as error:
        if click.get_current_context().find_root().params.get("debug"):
            raise
        if not isinstance(error, AGREED_ERRORS) or environment_world().is_main:
            click.echo(f"{error.prefix}: {in_flags(str(error))}", err=True)
        raise SystemExit(error.exit_code) from None


# Errors that every process of a distributed run raises alike (they follow agreed decisions):
# rank 0 alone says them.
AGREED_ERRORS = (DivergenceError, RunStopped, NothingToDo)


def friendly_errors(command):
    """A command whose user errors are one line (`one_line_errors`)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with one_line_errors():
            return command(*args, **kwargs)

    return wrapper


class DeviceType(click.ParamType):
    """--device, resolved as the command line is read (`resolve_device`): every command gets
    the same rule, and a device this torch cannot use is one line before any work starts."""

    name = "device"

    def convert(self, value, param, ctx) -> str:
        with one_line_errors():  # click's own usage errors would take four lines
            return resolve_device(value)


class JsonObject(click.ParamType):
    """A JSON object given on the command line, as a dict; anything else is one line."""

    name = "json"

    def convert(self, value, param, ctx) -> dict:
        if isinstance(value, dict):
            return value
        with one_line_errors():  # click's own usage errors would take four lines
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{flag_of(param)} {value!r} is not JSON ({error}).") from None
            if not isinstance(parsed, dict):
                raise ConfigError(
                    f"{flag_of(param)} {value!r} is not a JSON object: give "
                    "'{\"name\": value, ...}'."
                )
            return parsed


class FloatList(click.ParamType):
    """Comma-separated numbers, as a list; anything else is one line."""

    name = "numbers"

    def convert(self, value, param, ctx) -> list[float]:
        if isinstance(value, list):
            return value
        with one_line_errors():
            try:
                return [float(part) for part in value.split(",")]
            except ValueError:
                raise ConfigError(
                    f"{flag_of(param)} {value!r} is not comma-separated numbers."
                ) from None


def flag_of(param) -> str:
    """A parameter's flag as the command line spells it."""
    return param.opts[0] if param is not None and param.opts else "the value"


def fine_tuning_options() -> list:
    """P>M>F's F, an evaluation option of the metric methods (`metric.SupportFineTuning`)."""
    return [
        click.option(
            "--finetune-steps",
            default=None,
            type=click.IntRange(min=1),
            help="Before predicting each episode, fine-tune a copy of a metric method's encoder "
            "this many Adam steps on pseudo-episodes of its support set (P>M>F's F; inductive; "
            "docs/pretrained.md) [default: none].",
        ),
        click.option(
            "--finetune-lr",
            default=None,
            type=float,
            help="Its learning rate; choose it on the validation classes (docs/pretrained.md).",
        ),
        click.option(
            "--finetune-augment",
            default="crop",
            help="How its pseudo-queries are made from the support images: crop (random "
            "shifts), flip, or crop,flip.",
        ),
    ]


def requested_fine_tuning(
    steps: int | None, lr: float | None, augment: str
) -> SupportFineTuning | None:
    """The fine-tuning `--finetune-steps` asks for (both or neither of --finetune-steps and
    --finetune-lr), checked before anything is loaded; None where none is asked for."""
    if (steps is None) != (lr is None):
        raise ConfigError("--finetune-steps and --finetune-lr go together; give both.")
    if steps is None or lr is None:
        return None
    return SupportFineTuning(steps, lr, augment)


def trust_option():
    return click.option(
        "--trust-backbone",
        is_flag=True,
        help="Load a run whose backbone is a constructor (--backbone module:callable): that "
        "imports its module, which runs its code; give it only for code you trust.",
    )


def device_option():
    return click.option(
        "--device",
        default=AUTO,
        type=DeviceType(),
        help="torch device: auto (CUDA where this torch has it, else the CPU), cpu, cuda, "
        "cuda:N or mps; one this torch cannot use here is refused with those it can.",
    )


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
        papers = papers_defaults(name)
        help_text = in_flags(f"{f.metadata['help']}{methods} {default_text(f)}{papers}")
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


def papers_defaults(name: str) -> str:
    """The papers' values of a method setting, per dataset, as the methods declare them: e.g.
    " Papers: omniglot 0.4 (maml, anil), sinusoid 0.01 (maml)." (empty where none declare)."""
    values: dict[str, dict[str, list[str]]] = {}
    for method in METHODS.values():
        for dataset, defaults in method.defaults.items():
            if name in defaults:
                values.setdefault(dataset, {}).setdefault(str(defaults[name]), []).append(
                    method.name
                )
    if not values:
        return ""
    parts = [
        f"{dataset} {value} ({', '.join(methods)})"
        for dataset, by_value in values.items()
        for value, methods in by_value.items()
    ]
    return f" Papers: {'; '.join(parts)}."


def evaluation_options(command):
    """The options `eval` and `compare` share: data, episodes and their shape, seed, device."""
    options = [
        click.option(
            "--data-root",
            type=click.Path(path_type=Path),
            default=None,
            help="Folder with the Omniglot zips, the folder dataset, or the CSV file "
            "[default: $FEWSHOT_DATA_ROOT].",
        ),
        click.option("--download", is_flag=True, help="Fetch missing Omniglot zips."),
        click.option(
            "--episodes",
            default=600,
            type=int,
            help="Meta-test episodes (at least 2, for a confidence interval).",
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
                type=int,  # checked in one line: check_evaluation_request, load_run
                help=f"Test episodes' {what} [default: the run's].",
            )
            for name, what in (
                ("ways", "classes per episode (methods without a per-class head)"),
                ("shots", "support examples per class"),
                ("queries", "queries per class"),
            )
        ),
        device_option(),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
        trust_option(),
        *fine_tuning_options(),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# What `--resume` takes besides the options that shape no result (--threads, --device,
# --tensorboard): a longer run, and this invocation's time limit and meta-test.
RESUME_OPTIONS = {"iterations", "time_limit", "test_episodes"}
# A study makes its own run folders, and scores trials without a meta-test.
TRAIN_ONLY_OPTIONS = ("test_episodes", "resume", "out", "tensorboard")


# The sections of `fewshot train --help` (and tune's), by option name; a method's own settings
# go under "Method", anything unlisted under "Other".
HELP_SECTIONS = {
    "Data": (
        "dataset", "data_root", "download", "split", "image_size", "channels", "normalize",
        "augment", "label_column", "class_split",
    ),
    "Episodes": ("ways", "shots", "queries", "train_ways", "train_queries", "sampler"),
    "Method": ("algorithm",),
    "Backbone": (
        "backbone", "backbone_args", "backbone_weights", "weights_prefix", "freeze",
        "cache_features", "pixel_mean", "pixel_std",
    ),
    "Optimisation": ("meta_batch", "outer_lr", "iterations", "seed", "init"),
    "Run and checkpoints": (
        "out", "resume", "config_file", "val_every", "val_episodes", "test_episodes",
        "checkpoint_every", "time_limit", "tensorboard",
    ),
    "Hardware": ("device", "threads"),
}  # fmt: skip
TRAIN_EXAMPLES = """\b
Examples:
  fewshot train --out runs/sinusoid                      # MAML on sinusoids, a few minutes
  fewshot train --algorithm protonet --dataset omniglot --data-root DIR --iterations 2000
  fewshot train --resume runs/sinusoid --iterations 16000   # extend a finished run"""


class SectionedCommand(click.Command):
    """A command whose --help lists its options in sections (HELP_SECTIONS)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        settings = {f.name for m in METHODS.values() for f in fields(m.settings)}
        section_of = {name: title for title, names in HELP_SECTIONS.items() for name in names}
        sections: dict[str, list] = {title: [] for title in [*HELP_SECTIONS, "Other"]}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            title = "Method" if param.name in settings else section_of.get(param.name, "Other")
            sections[title].append(record)
        for title, records in sections.items():
            if records:
                with formatter.section(f"{title} options"):
                    formatter.write_dl(records)


class RegisteredChoice(click.Choice):
    """A choice among a registry's names as they are when the command line is read, so that a
    registration after this module is imported counts."""

    def __init__(self, registry: Mapping[str, object]) -> None:
        self.registry = registry
        super().__init__(list(registry))

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.registry)

    @choices.setter
    def choices(self, names) -> None:  # click's __init__ sets them: the registry holds them
        pass


def training_options(skip: tuple[str, ...] = ()):
    """The options of `fewshot train`, in its help's order, less those named in `skip`: `tune`
    takes the same ones, so that every trial accepts exactly what a training run does."""
    options = {
        "algorithm": click.option(
            "--algorithm",
            default="maml",
            type=click.Choice(list(METHODS)),
            help="Meta-learning method (`fewshot methods` lists them with their settings).",
        ),
        "dataset": click.option(
            "--dataset",
            default="sinusoid",
            type=RegisteredChoice(DATASETS),
            help="Sinusoid regression (built in), Omniglot (the official zips), your own image "
            "folder (--data-root with train/, val/, test/ of class folders), the rows of your "
            "own CSV file (--data-root FILE.csv --label-column NAME), or a benchmark in its "
            "published layout: mini-imagenet, tiered-imagenet, cifar-fs, fc100, cub "
            "(docs/datasets.md).",
        ),
        "data_root": click.option(
            "--data-root",
            type=click.Path(path_type=Path),
            default=None,
            help="Omniglot: folder with images_background.zip and images_evaluation.zip; folder "
            "dataset: folder with train/, val/, test/; csv: the CSV file; a benchmark: its "
            "folder as published (docs/datasets.md) "
            "[default: $FEWSHOT_DATA_ROOT, else ~/.local/share/fewshot].",
        ),
        "download": click.option(
            "--download",
            is_flag=True,
            help="Fetch missing Omniglot zips from the official address (checksum-verified).",
        ),
        "split": click.option(
            "--split",
            default="vinyals",
            type=click.Choice(["vinyals", "lake"]),
            help="Omniglot class split (see docs/datasets.md).",
        ),
        "backbone": click.option(
            "--backbone",
            default="conv4",
            help="The network for images: conv4 (Conv4 of 64 filters), conv4-32 (of 32, Finn et "
            "al. 2017 on miniImageNet), resnet12 (64-160-320-640 filters, Lee et al. 2019), "
            "resnet12-narrow (64-128-256-512, Oreshkin et al. 2018) (docs/models.md); or any "
            "constructor, package.module:callable or path/file.py:callable, called with "
            "--backbone-args, whose flattened output is the embedding (docs/pretrained.md).",
        ),
        "backbone_args": click.option(
            "--backbone-args",
            default=None,
            type=JsonObject(),
            help="Keyword arguments of a constructor --backbone, as a JSON object, e.g. "
            '{"depth": 18}.',
        ),
        "backbone_weights": click.option(
            "--backbone-weights",
            default=None,
            type=click.Path(dir_okay=False),
            help="Start the backbone from these weights: a .safetensors file, or a PyTorch state "
            "dict (read with weights_only=True, never unpickled code); every key must fit.",
        ),
        "weights_prefix": click.option(
            "--weights-prefix",
            default=None,
            help="A prefix of the weights file's keys to strip (e.g. module. or backbone.; keys "
            "without it are left out), or +PREFIX to add to every key.",
        ),
        "freeze": click.option(
            "--freeze",
            default=None,
            help="What meta-training leaves fixed (parameters and batch-norm statistics): "
            + "; ".join(f"{k}: {v}" for k, v in FREEZE_KEYWORDS.items())
            + "; or comma-separated prefixes of the backbone's parameter names (0.,1. for a "
            "Sequential's first two blocks) [default: nothing].",
        ),
        "cache_features": click.option(
            "--cache-features/--no-cache-features",
            default=None,
            help="With the backbone frozen whole (--freeze backbone), compute each image's "
            "features once, for training and evaluation alike (docs/pretrained.md) [default: "
            "yes].",
        ),
        "pixel_mean": click.option(
            "--pixel-mean",
            default=None,
            type=FloatList(),
            help="Per-channel mean to standardise images with, as a pretrained backbone expects "
            "(0.485,0.456,0.406 for ImageNet's); recorded (folder and benchmark datasets) "
            "[default: the training images', with --normalize].",
        ),
        "pixel_std": click.option(
            "--pixel-std",
            default=None,
            type=FloatList(),
            help="Per-channel standard deviation, with --pixel-mean.",
        ),
        "image_size": click.option(
            "--image-size", default=28, type=int, help="Side of the images (folder dataset)."
        ),
        "channels": click.option(
            "--channels",
            default=None,
            type=int,
            help="1: grayscale, 3: RGB (folder dataset) [default: 3 if a training image has "
            "colour, else 1].",
        ),
        "normalize": click.option(
            "--normalize/--no-normalize",
            default=None,
            help="Standardise each channel with the training images' mean and standard "
            "deviation (folder and benchmark datasets; recorded, and applied by eval and adapt "
            "too) [default: no].",
        ),
        "augment": click.option(
            "--augment",
            default=None,
            help="Augment training episodes' images: flip (random horizontal flips), crop "
            "(random crops of the image reflect-padded by 1/8 of its side), or flip,crop "
            "(folder dataset) [default: none].",
        ),
        "label_column": click.option(
            "--label-column",
            default=None,
            help="The CSV column that names each row's class (--dataset csv; every other "
            "column is a numeric feature).",
        ),
        "class_split": click.option(
            "--class-split",
            default=None,
            help="TRAIN,VAL,TEST: the shares of the CSV's classes for meta-training, validation "
            "and meta-test (--dataset csv) [default: 0.6,0.2,0.2].",
        ),
        "ways": click.option(
            "--ways", default=5, type=int, help="N: classes per episode (evaluation episodes)."
        ),
        "shots": click.option(
            "--shots", default=None, type=int, help=f"K: support examples per class {PAPER}."
        ),
        "queries": click.option(
            "--queries", default=None, type=int, help=f"Q: query examples per class {PAPER}."
        ),
        "train_ways": click.option(
            "--train-ways",
            default=None,
            type=int,
            help=f"Classes per training episode {PAPER}, else --ways.",
        ),
        "train_queries": click.option(
            "--train-queries",
            default=None,
            type=int,
            help=f"Queries per class in training episodes {PAPER}, else --queries.",
        ),
        "sampler": click.option(
            "--sampler",
            default="fixed",
            type=click.Choice(SAMPLERS),
            help="Episodes of a classification dataset: N-way K-shot (--ways, --shots, "
            "--queries), or Meta-Dataset's: 5 to 50 ways, imbalanced shots, up to 10 queries "
            "per class, Omniglot's from one alphabet; one episode per process at a time "
            "(--meta-batch 1), for methods without a per-class head (docs/datasets.md).",
        ),
        "meta_batch": click.option(
            "--meta-batch",
            default=None,
            type=int,
            help=f"Tasks per outer update; examples per batch for the methods that pretrain on "
            f"ordinary batches (baseline, baseline++, finetune) {PAPER}.",
        ),
        "outer_lr": click.option(
            "--outer-lr", default=None, type=float, help="Outer learning rate (beta)."
        ),
        "method_settings": method_options,
        "time_limit": click.option(
            "--time-limit",
            default=None,
            type=float,
            help="Stop (validating and checkpointing first) after this many minutes of training.",
        ),
        "iterations": click.option(
            "--iterations", default=None, type=int, help=f"Outer updates {PAPER}."
        ),
        "val_every": click.option(
            "--val-every",
            default=None,
            type=int,
            help=f"Validate (and keep the best checkpoint) every this many iterations {PAPER}.",
        ),
        "val_episodes": click.option(
            "--val-episodes", default=200, type=int, help="Episodes per validation."
        ),
        "test_episodes": click.option(
            "--test-episodes",
            default=600,
            type=int,
            help="Meta-test episodes evaluated at the end (0 to skip).",
        ),
        "checkpoint_every": click.option(
            "--checkpoint-every",
            default=100,
            type=int,
            help="Write the resumable checkpoint every this many iterations.",
        ),
        "seed": click.option(
            "--seed", default=0, type=int, help="Seed for initialisation and task sampling."
        ),
        "init": click.option(
            "--init",
            type=click.Path(file_okay=False),
            default=None,
            help="Start from the best weights of this run (the same method and network), with a "
            "new optimizer and schedule.",
        ),
        "config_file": click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="JSON file of training settings; options given here override it.",
        ),
        "resume": click.option(
            "--resume",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Continue the interrupted run in this folder, exactly where it stopped.",
        ),
        "device": device_option(),
        "threads": click.option(
            "--threads",
            default=None,
            type=click.IntRange(min=1),
            help="CPU threads [default: 1 for sinusoid, whose tiny model runs fastest so; "
            "else all].",
        ),
        "out": click.option(
            "--out",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Run folder to create (new or empty): config.json, metrics.jsonl, "
            "model.safetensors [default: a new folder runs/ALGORITHM-DATASET-TIMESTAMP].",
        ),
        "tensorboard": click.option(
            "--tensorboard",
            is_flag=True,
            help="Also log the metrics for TensorBoard, in RUN_DIR/tensorboard "
            "(tensorboard --logdir RUN_DIR).",
        ),
    }

    def decorate(command):
        for name, option in reversed(options.items()):
            if name not in skip:
                command = option(command)
        return command

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--debug", is_flag=True, help="Show full tracebacks for user errors.")
@click.version_option(package_name="fewshot")
def main(debug: bool) -> None:
    """Meta-learning for PyTorch: meta-train a method, evaluate few-shot accuracy."""


@main.command(name="train", cls=SectionedCommand, epilog=TRAIN_EXAMPLES)
@training_options()
@trust_option()
@friendly_errors
def train_command(
    data_root, download, device, threads, out, config_file, resume, tensorboard, trust_backbone,
    **options,
):  # fmt: skip
    """Meta-train a model and write a run folder with the best checkpoint.

    Ctrl-C (or SIGTERM) stops after the current iteration with a checkpoint; `--resume RUN_DIR`
    continues from it (with `--iterations N`, a finished run is extended to N).
    """
    given = explicitly_given(options)
    main_process = environment_world().is_main  # under torchrun, rank 0 reads, logs, reports
    if resume is not None:
        refused = given - RESUME_OPTIONS
        if refused or config_file is not None:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(refused))
            raise ConfigError(
                f"--resume continues {resume} with the settings in its config.json (only "
                f"--iterations may extend it, and --time-limit and --test-episodes apply to "
                f"this invocation); drop {flags or '--config'}."
            )
        # rank 0 reads the run folder and sends it to the others, which may not reach it
        out, config = resume, read_config(resume) if main_process else None
    else:
        base = read_config_file(config_file) if config_file else {}
        own = command_options_from_file(
            base, data_root=data_root, download=download, device=device, threads=threads,
            out=out, tensorboard=tensorboard,
        )  # fmt: skip
        data_root, download, device = own["data_root"], own["download"], own["device"]
        threads, out, tensorboard = own["threads"], own["out"], own["tensorboard"]
        settings = {**base, **{k: options[k] for k in given}}
        check_episode_settings(settings)
        config = TrainConfig.from_dict(settings)
        out = out or fresh_run_folder(config)
    set_threads(None if config is None else config.dataset, threads)
    listeners = [TensorBoardLogger(out)] if tensorboard and main_process else []
    extend_to = options["iterations"] if resume is not None and "iterations" in given else None
    time_limit = options["time_limit"] if resume is not None and "time_limit" in given else None
    try:
        algorithm, sources, best = train(
            config, out, data_root, download, device, resume=resume is not None,
            listeners=listeners, iterations=extend_to, time_limit=time_limit,
            trust_backbone=trust_backbone,
        )  # fmt: skip
    finally:
        for listener in listeners:
            listener.close()
    if not main_process:
        return
    click.echo(f"best validation: {best}")
    resolved = read_config(out)
    test_episodes = options["test_episodes"] if "test_episodes" in given else resolved.test_episodes
    if test_episodes > 0 and trained_iterations(out) == resolved.iterations:  # once, at the end
        report = test_report(
            algorithm, resolved, sources.test, test_episodes, TEST_SEED, None, device
        )
        for line in report["lines"]:
            click.echo(f"meta-test {line}")
    click.echo(f"run folder: {out}")


def command_options_from_file(values: dict, **current) -> dict:
    """The command's own options (data root, device, threads, run folder, ...) with the values
    a --config file holds for them, where the command line did not give them; those keys are
    taken out of `values`, which keeps the training settings."""
    context = click.get_current_context()
    params = {p.name: p for p in context.command.params}
    for name in current:
        if name not in values:
            continue
        value = values.pop(name)
        if context.get_parameter_source(name) is click.core.ParameterSource.DEFAULT:
            try:
                current[name] = params[name].process_value(context, value)
            except click.BadParameter as error:
                raise ConfigError(f"the config file's {name}: {error.format_message()}") from None
    return current


def fresh_run_folder(config: TrainConfig) -> Path:
    """A new folder under runs/ for a run given no --out: ALGORITHM-DATASET-TIMESTAMP."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config.algorithm}-{config.dataset}-{stamp}"
    candidates = (base.with_name(f"{base.name}-{n}") if n else base for n in itertools.count())
    return next(path for path in candidates if not path.exists())


def set_threads(dataset: str | None, threads: int | None) -> None:
    """Small models lose more to thread synchronisation than they gain from a second core."""
    if threads or (dataset in DATASETS and DATASETS[dataset].one_thread):
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


@main.command(name="tune", cls=SectionedCommand)
@training_options(skip=TRAIN_ONLY_OPTIONS)
@click.option(
    "--study-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Study folder: a run folder per trial (trial-0000, ...), study.json, best.json, "
    "best-command.txt, and study.db with the default storage.",
)
@click.option(
    "--trials",
    default=20,
    type=click.IntRange(min=1),
    help="Trials to run in this invocation (run again to add as many to the study).",
)
@click.option(
    "--timeout",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Start no trial after this many minutes (the running one finishes).",
)
@click.option(
    "--storage",
    default=None,
    metavar="URL",
    help="Optuna RDB storage, which several processes or machines can share, e.g. "
    "postgresql://user:password@host/db [default: sqlite:///STUDY_DIR/study.db].",
)
@click.option(
    "--study-name", default=None, help="The study's name in the storage [default: STUDY_DIR's]."
)
@click.option(
    "--search",
    "searches",
    multiple=True,
    metavar="NAME=LOW:HIGH[:log][:int] | NAME=A,B,...",
    help="Search this training option too, or over this range (repeatable) [default: the "
    "outer and the method's learning rates, log-uniform from a tenth to ten times their "
    "default; inner steps, 1 to max(5, twice the default)].",
)
@click.option(
    "--sampler-seed",
    default=None,
    type=int,
    help="Seed of the TPE sampler; give each process that shares a study its own "
    "[default: --seed].",
)
@click.option(
    "--prune-after",
    default=5,
    type=click.IntRange(min=0),
    help="Completed trials before pruning starts.",
)
@click.option(
    "--pruning/--no-pruning",
    default=True,
    help="Stop a trial whose best validation, from its second validation on, is worse than the "
    "median of the completed trials' at the same iteration.",
)
@friendly_errors
def tune_command(
    data_root,
    download,
    device,
    threads,
    config_file,
    study_dir,
    trials,
    timeout,
    storage,
    study_name,
    searches,
    sampler_seed,
    prune_after,
    pruning,
    **options,
):
    """Search the learning rates and inner steps (or any training option) with Optuna.

    The options given are fixed for every trial; each trial meta-trains STUDY_DIR/trial-NNNN
    and is scored by its best validation result. Prints a line per trial, then a table of all
    and the best settings; STUDY_DIR/best-command.txt is the `fewshot train` command of the
    best. Run it again to continue the study. See docs/tuning.md.
    """
    from fewshot.training import tuning

    optuna = tuning.import_optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the study prints a line per trial
    given = explicitly_given(options)
    base = read_config_file(config_file) if config_file else {}
    base = {**base, **{k: options[k] for k in given}}
    space = tuning.search_space(base, searches, fixed=given, device=device)
    set_threads(TrainConfig.from_dict(base).dataset, threads)
    study = tuning.tune(
        base,
        space,
        study_dir,
        trials,
        storage=storage,
        study_name=study_name,
        data_root=data_root,
        download=download,
        device=device,
        seed=sampler_seed,
        timeout=timeout,
        prune_after=prune_after if pruning else None,
        log=click.echo,
        command_arguments=["--threads", str(threads)] if threads else [],
    )
    click.echo(tuning.trials_table(study))
    click.echo(tuning.best_summary(study, study_dir))


@main.command(name="eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--batch-norm",
    default=None,
    type=click.Choice(BATCH_NORM_POLICIES),
    help="Batch-norm policy at prediction [default: the run's, which is its method's paper's].",
)
@click.option(
    "--sampler",
    default=None,
    type=click.Choice(SAMPLERS),
    help="Test episodes: N-way K-shot ones (fixed), or Meta-Dataset's (5 to 50 ways, "
    "imbalanced shots, up to 10 queries per class; Omniglot's from one alphabet) [default: "
    "the run's].",
)
@evaluation_options
@friendly_errors
def eval_command(
    run_dir, data_root, download, episodes, inner_steps, batch_norm, sampler, seed, device,
    as_json, trust_backbone, finetune_steps, finetune_lr, finetune_augment, **shape,
):  # fmt: skip
    """Meta-test accuracy (or MSE) ± 95% CI of RUN_DIR's best checkpoint on held-out classes."""
    check_evaluation_request(episodes, shape)
    episode = {**shape, "sampler": sampler}
    fine_tuning = requested_fine_tuning(finetune_steps, finetune_lr, finetune_augment)
    config, algorithm, sources = load_run(
        run_dir, data_root, download, device, batch_norm, episode, trust_backbone
    )
    check_meta_dataset_evaluation(run_dir, config, algorithm, shape)
    check_inner_steps_apply(inner_steps, run_dir, config.algorithm, algorithm)
    if fine_tuning is not None:
        algorithm.set_support_fine_tuning(fine_tuning)
    set_threads(config.dataset, None)
    report = test_report(algorithm, config, sources.test, episodes, seed, inner_steps, device)
    lines = report.pop("lines")
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(f"{config.algorithm}, batch norm: {BATCH_NORM_NOTES[algorithm.batch_norm]}")
        for line in lines:
            click.echo(f"meta-test {line}")


def check_meta_dataset_evaluation(run_dir, config, algorithm, shape: dict) -> None:
    """Meta-Dataset's test episodes (the run's, or asked for) take no fixed ways, shots or
    queries, and only a model without a per-class head can answer them."""
    if config.sampler != "meta-dataset":
        return
    given = [f"--{name}" for name, value in shape.items() if value is not None]
    if given:
        raise ConfigError(
            f"--sampler meta-dataset draws each episode's ways, shots and queries; drop "
            f"{', '.join(given)}."
        )  # (fewshot train refuses them too: TrainConfig.check)
    if algorithm.max_ways is not None:
        raise ConfigError(
            f"Meta-Dataset episodes have up to 50 ways, but {run_dir}'s {config.algorithm} "
            f"model has a {algorithm.max_ways}-way head; evaluate a method without a per-class "
            "head (protonet, matchingnet, relationnet)."
        )


def check_evaluation_request(episodes: int, shape: dict) -> None:
    """Refuse, before any loading, an evaluation that cannot report anything meaningful: one
    episode has no confidence interval, and a one-way episode cannot be answered wrongly."""
    if episodes < 2:
        raise ConfigError(
            f"--episodes must be at least 2 (a confidence interval needs two scores), got "
            f"{episodes}."
        )
    if shape.get("ways") is not None and shape["ways"] < 2:
        raise ConfigError(
            f"--ways must be at least 2 (every answer in a one-class episode is right), got "
            f"{shape['ways']}."
        )


def check_inner_steps_apply(inner_steps: int | None, run_dir: Path, name: str, algorithm) -> None:
    """--inner-steps sets how many steps a method adapts by; refused for a method that has no
    steps (a metric method), rather than ignored while the result claims them."""
    if inner_steps is not None and not algorithm.adapts_by_steps:
        raise ConfigError(
            f"--inner-steps does not apply to {run_dir}: {name} adapts without steps; drop "
            "--inner-steps."
        )


@main.command(name="compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@evaluation_options
@friendly_errors
def compare_command(
    run_dirs, data_root, download, episodes, inner_steps, seed, device, as_json, trust_backbone,
    finetune_steps, finetune_lr, finetune_augment, **shape,
):  # fmt: skip
    """Evaluate RUN_DIRS on the same test episodes; compare every pair with a paired test.

    Prints each run's accuracy (or MSE) ± 95% CI, then for each pair the mean per-episode
    difference ± its 95% CI and the p-value of a paired t-test.
    """
    if len(run_dirs) < 2:
        raise click.BadParameter("give at least two run folders", param_hint="RUN_DIRS")
    check_evaluation_request(episodes, shape)
    configs = [read_config(run_dir) for run_dir in run_dirs]
    for config in configs:
        override_test_episodes(config, shape)
    episodes_shape = check_same_episodes(run_dirs, configs)
    fine_tuning = requested_fine_tuning(finetune_steps, finetune_lr, finetune_augment)
    loaded = [
        load_run(run_dir, data_root, download, device, episode=shape, trust_backbone=trust_backbone)
        for run_dir in run_dirs
    ]
    for run_dir, (config, algorithm, _) in zip(run_dirs, loaded):
        check_inner_steps_apply(inner_steps, run_dir, config.algorithm, algorithm)
        if fine_tuning is not None:
            algorithm.set_support_fine_tuning(fine_tuning)
    set_threads(loaded[0][0].dataset, None)
    scores, runs = [], []
    for run_dir, (config, algorithm, sources) in zip(run_dirs, loaded):
        result, run_scores = evaluate_episodes(
            algorithm, sources.test, episodes, seed, inner_steps, device, progress=True
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
    if get_dataset(shape["dataset"]).regression:
        return f"sinusoid regression, K = {shape['shots']}, {shape['queries']} query points"
    split = f" ({shape['split']} split)" if applies("split", shape["dataset"]) else ""
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


@main.command(name="adapt")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--support",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder with one subfolder of images per new class: SUPPORT/<class>/<image>.",
)
@click.option(
    "--predict",
    "predict",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Images to classify (files, or folders of them); IMAGES after it are added.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the predictions to FILE.csv or FILE.json instead of printing them.",
)
@click.option(
    "--invert",
    type=click.Choice(INVERT_CHOICES),
    default="auto",
    help="Invert images (255 - pixel): auto when an image's border is light where the "
    "training images' background is dark (or the reverse), always, or never.",
)
@click.option(
    "--convert", is_flag=True, help="Convert colour images for a grayscale model (or reverse)."
)
@click.option(
    "--inner-steps",
    default=None,
    type=click.IntRange(min=0),
    help="Adaptation steps of gradient-based methods [default: the run's].",
)
@click.option(
    "--batch-norm",
    default="inductive",
    type=click.Choice(BATCH_NORM_POLICIES),
    help="inductive: each prediction independent of the other images; transductive: the "
    "images predicted together normalise each other.",
)
@click.option("--seed", default=0, type=int, help="Seed of adaptation's own random draws.")
@device_option()
@trust_option()
@friendly_errors
def adapt_command(
    run_dir,
    images,
    support,
    predict,
    output,
    invert,
    convert,
    inner_steps,
    batch_norm,
    seed,
    device,
    trust_backbone,
):
    """Adapt RUN_DIR's trained model to your own classes and classify images.

    The support images are read as the run's training images were (size, channels, and the
    inversion of drawings); each image gets the predicted class and every class's probability.
    """
    if output is not None and output.suffix not in (".csv", ".json"):
        raise ConfigError(f"--output {output}: write to a .csv or a .json file.")
    paths = query_files([*predict, *images])
    method = load(run_dir, device, batch_norm, trust_backbone=trust_backbone)
    check_inner_steps_apply(inner_steps, run_dir, type(method).__name__, method)
    if method.preprocessing is None:
        raise ConfigError(
            f"{run_dir} was trained on --dataset {method.config.dataset}; adapt reads "
            "images, for runs trained on Omniglot or an image folder."
        )
    support_set, support_inverted = method.preprocessing.read_support(support, invert, convert)
    queries, inverted = method.preprocessing.read_images(paths, invert, convert)
    with prediction_mode(method, seed, device):
        predictor = method.adapt(support_set, inner_steps=inner_steps)
        probabilities = predictor.probabilities(queries)
    rows = [
        {
            "image": str(path),
            "prediction": support_set.classes[int(p.argmax())],
            "probabilities": dict(zip(support_set.classes, p.tolist())),
            "inverted": was_inverted,
        }
        for path, p, was_inverted in zip(paths, probabilities, inverted)
    ]
    counts = torch.bincount(support_set.y).tolist()
    shots = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)} to {max(counts)}"
    shots += " image each" if max(counts) == 1 else " images each"
    click.echo(
        f"adapted {run_dir} ({type(method).__name__}, batch norm {method.batch_norm}) to "
        f"{len(counts)} classes, {shots}; inverted {sum(support_inverted)} of "
        f"{len(support_inverted)} support and {sum(inverted)} of {len(inverted)} query images"
    )
    if output is None:
        click.echo(prediction_table(rows, support_set.classes))
        return
    write_predictions(output, rows, support_set.classes)
    click.echo(f"{len(rows)} predictions written to {output}")


def query_files(paths: list[Path]) -> list[Path]:
    """The image files named: files as given, folders as the files within them, sorted."""
    if not paths:
        raise ConfigError("name the images to classify: --predict PATH [PATH ...].")
    files = []
    for path in paths:
        if path.is_dir():
            files.extend(image_files(path, recursive=True))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist.")
    if not files:
        raise DataError(f"no images in {', '.join(map(str, paths))}.")
    return files


def prediction_table(rows: list[dict], classes: list[str]) -> str:
    """One line per image: its path, predicted class and every class's probability."""
    header = ["image", "prediction", *classes]
    lines = [
        [r["image"], r["prediction"], *(f"{r['probabilities'][c]:.3f}" for c in classes)]
        for r in rows
    ]
    return format_table(header, lines)


def write_predictions(path: Path, rows: list[dict], classes: list[str]) -> None:
    """Predictions as CSV (image, prediction, inverted, one probability column per class) or
    JSON (a list of rows), written atomically."""
    if path.suffix == ".json":
        text = json.dumps({"classes": classes, "predictions": rows}, indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image", "prediction", "inverted", *classes])
        for r in rows:
            probabilities = [f"{r['probabilities'][c]:.6f}" for c in classes]
            writer.writerow([r["image"], r["prediction"], int(r["inverted"]), *probabilities])
        text = buffer.getvalue()
    atomic_write_text(path, text)


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
        "settings": {f.name: in_flags(f.metadata["help"]) for f in fields(method.settings)},
        "defaults": method.defaults,
    }


@main.command(name="plot")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the PNGs [default: RUN_DIR/plots].",
)
@click.option(
    "--baseline",
    type=click.Path(path_type=Path),
    default=None,
    help="A run on the same test episodes, e.g. a pretrained and fine-tuned one (`fewshot "
    "train --algorithm finetune`): beside RUN_DIR in the sinusoid figure and the adaptation "
    "curve.",
)
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder with the Omniglot zips, or the folder dataset [default: $FEWSHOT_DATA_ROOT].",
)
@click.option(
    "--steps",
    default=10,
    type=click.IntRange(min=1),
    help="k: the adaptation curve runs from 0 to k inner steps, the sinusoid figure shows 0, 1 "
    "and k.",
)
@click.option(
    "--episodes",
    default=100,
    type=click.IntRange(min=1),
    help="Test episodes per point of the adaptation curve.",
)
@click.option(
    "--seed",
    default=TEST_SEED,
    type=int,
    help="Episode seed: the figures use the episodes `fewshot eval --seed` draws.",
)
@trust_option()
@friendly_errors
def plot_command(run_dir, out, baseline, data_root, steps, episodes, seed, trust_backbone):
    """PNG figures of RUN_DIR: training curves, the adaptation curve, and the sinusoid fits
    (Finn et al.'s Figure 2) or one classified test episode."""
    from fewshot import plots

    plots.require_matplotlib()
    config = read_config(run_dir)
    if baseline is not None:
        check_same_episodes([run_dir, baseline], [config, read_config(baseline)])
    set_threads(config.dataset, None)
    plots.write_plots(
        run_dir, out, baseline, data_root, steps, episodes, seed, click.echo, trust_backbone
    )


def run() -> None:
    """Console entry point: restart once under allocator settings for the command
    (`malloc_settings`), then run `main`.

    glibc and torch read these variables only at start-up, hence the restart.
    """
    settings = malloc_settings(sys.argv[1:], os.environ)
    if settings:
        restart_under(settings, [sys.executable, "-m", "fewshot", *sys.argv[1:]])
    main(prog_name="fewshot")


def restart_under(settings: Mapping[str, str], argv: list[str]) -> None:
    """Replace this process by `argv` under its environment plus `settings` (variables the
    allocators read only at start-up); where that fails, go on as it is."""
    with contextlib.suppress(OSError):
        os.execve(sys.executable, argv, {**os.environ, **settings})


def malloc_settings(argv: list[str], environment: Mapping[str, str]) -> dict[str, str] | None:
    """The allocator settings `fewshot` restarts under: on Linux, unless a MALLOC_*_ variable or
    FEWSHOT_NO_MALLOC_TUNING is set, `TUNED_MALLOC`, which keeps freed memory in the process
    for speed, or `LEAN_MALLOC` for a command that checkpoints inner steps, whose point is
    memory, less any variable the user set (their THP_MEM_ALLOC_ENABLE stands). None: start as
    it is."""
    if (
        sys.platform != "linux"
        or any(key.startswith("MALLOC_") for key in environment)
        or environment.get("FEWSHOT_NO_MALLOC_TUNING")
    ):
        return None
    settings = LEAN_MALLOC if checkpoints_inner(argv) else TUNED_MALLOC
    return {key: value for key, value in settings.items() if key not in environment}


def checkpoints_inner(argv: list[str]) -> bool:
    """Whether the command's resolved settings ask for `checkpoint_inner`: its own flag, else
    its --config file's, else the config.json of the run it resumes. A file that cannot be read
    counts as no: the command itself then says what is wrong with it."""
    flags = [a for a in argv if a in ("--checkpoint-inner", "--no-checkpoint-inner")]
    if flags:
        return flags[-1] == "--checkpoint-inner"
    recorded = (("--resume", resumed_settings), ("--config", read_config_file))
    for flag, read in recorded:
        path = option_value(argv, flag)
        if path is not None:
            try:
                return bool(read(Path(path)).get("checkpoint_inner"))
            except (FewshotError, OSError):
                return False
    return False


def resumed_settings(run_dir: Path) -> dict:
    return dataclasses.asdict(read_config(run_dir).settings)


def option_value(argv: list[str], flag: str) -> str | None:
    """The value given to `flag` in `argv` ("--flag VALUE" or "--flag=VALUE"), the last one."""
    value = None
    for i, argument in enumerate(argv):
        if argument == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif argument.startswith(flag + "="):
            value = argument.removeprefix(flag + "=")
    return value
