"""Learning-rate search with Optuna: the outer and inner learning rates and the inner steps,
or any training option named, scored on the validation classes.

A study is a folder: one run folder per trial (`trial-0000`, ...), `study.json` (what is fixed
and what is searched), and, once a trial completes, `best.json` and `best-command.txt` (the
`fewshot train` command of the best trial). The trials themselves live in an Optuna storage,
`sqlite:///STUDY_DIR/study.db` unless another RDB URL is given, so that rerunning the command
continues the study and several processes or machines can share it. Optuna is imported only
here, and only when a study runs, so that `import fewshot` does not need it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shlex
import socket
import typing
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from fewshot.algorithms.registry import METHODS, InnerLoopSettings, Method, get_method
from fewshot.devices import describe_device
from fewshot.errors import ConfigError, DivergenceError, FewshotError, RunStopped
from fewshot.files import atomic_write, atomic_write_text
from fewshot.progress import format_table, progress_bar
from fewshot.training.config import TrainConfig, run_setting_names
from fewshot.training.factory import build_sources
from fewshot.training.loop import Listener, train

if TYPE_CHECKING:
    import optuna
    from optuna import Study
    from optuna.trial import FrozenTrial

STUDY_FILE = "study.json"
BEST_FILE = "best.json"
BEST_COMMAND_FILE = "best-command.txt"
LEARNING_RATE_SPAN = 10  # a default rate is searched from its value / SPAN to its value * SPAN
MIN_INNER_STEPS_HIGH = 5  # inner steps are searched from 1 to max(5, twice the paper's)
PRUNE_AFTER = 5  # completed trials before the median pruner may prune
HEARTBEAT_SECONDS = 60  # a trial silent for twice this long (its process killed) is failed
FINISHED = ("COMPLETE", "PRUNED")  # trial states that keep a result

# Options that define the validation episodes, the scoring, or nothing learned: searching them
# would compare trials on different tasks or only find a lucky draw.
NOT_SEARCHABLE = {
    **dict.fromkeys(
        (
            "algorithm",
            "dataset",
            "split",
            "image_size",
            "channels",
            "label_column",
            "ways",
            "shots",
            "queries",
        ),
        "defines the validation episodes that score the trials; fix it with {flag}",
    ),
    "features": "comes from the data",
    "val_every": "sets when trials are scored and pruned; fix it with {flag}",
    "val_episodes": "sets how trials are scored; fix it with {flag}",
    "seed": "is the study's fixed seed (a search over seeds finds a lucky one); fix it with {flag}",
    "time_limit": "is a budget per trial, not a setting to learn; fix it with {flag}",
    **dict.fromkeys(
        ("checkpoint_every", "vectorize", "chunk_size"),
        "changes speed or memory, not results; fix it with {flag}",
    ),
}
# Left out of the comparison of a continued study's settings with its first run's.
SPEED_SETTINGS = ("checkpoint_every", "vectorize", "chunk_size")


class OptunaMissing(FewshotError):
    """`fewshot tune` was asked for without Optuna installed."""


def import_optuna():
    """The optuna module, or a one-line error saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise OptunaMissing("fewshot tune needs Optuna: pip install 'fewshot[tune]'") from None
    return optuna


@dataclass(frozen=True)
class SearchDimension:
    """One searched option: numbers from `low` to `high` (integers if `integer`, log-uniform
    if `log`), or one of `choices`."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value of this option, drawn by the study's sampler."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None  # numbers, without choices
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def extremes(self) -> list:
        """The values that reach the edges of the dimension, to check before any trial."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None  # numbers, without choices
        return [int(v) if self.integer else v for v in (self.low, self.high)]

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name}: one of {', '.join(map(str, self.choices))}"
        kind = "integers" if self.integer else "numbers"
        low, high = (format_param(value) for value in self.extremes())
        return f"{self.name}: {kind} from {low} to {high}{', log-uniform' * self.log}"


def option_types(method: Method) -> dict[str, tuple[type, tuple | None]]:
    """The type and choices of every run setting and of `method`'s own settings, by name."""
    types = {}
    for holder in (TrainConfig, method.settings):
        hints = typing.get_type_hints(holder)
        for f in fields(holder):
            if f.name != "settings":
                hint = hints[f.name]
                kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
                types[f.name] = (kind, f.metadata.get("choices"))
    return types


def parse_search(text: str, method: Method) -> SearchDimension:
    """A dimension from `--search` text: NAME=LOW:HIGH[:log][:int] or NAME=A,B,... ."""
    name, equals, spec = text.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    if not equals or not name or not spec:
        raise ConfigError(
            f"`search={text}`: write NAME=LOW:HIGH[:log][:int] or NAME=A,B,... (choices)."
        )
    types = option_types(method)
    if name in NOT_SEARCHABLE:
        reason = NOT_SEARCHABLE[name].format(flag=f"`{name}`")
        raise ConfigError(f"`search={text}`: {name} {reason}.")
    if name not in types:
        searchable = ", ".join(n for n in types if n not in NOT_SEARCHABLE)
        known = any(name in option_types(m) for m in METHODS.values())
        what = f"{method.name} has no setting {name}" if known else f"{name} is no training option"
        raise ConfigError(f"`search={text}`: {what}; {method.name} can search {searchable}.")
    kind, choices = types[name]
    try:
        if ":" in spec:
            return _range_dimension(name, kind, spec)
        if "," in spec:
            return _choice_dimension(name, kind, choices, spec)
    except (ConfigError, ValueError) as error:
        raise ConfigError(f"`search={text}`: {error}") from None
    raise ConfigError(
        f"`search={text}`: give a range LOW:HIGH[:log][:int] or choices A,B,...; to fix one "
        f"value use `{name}={spec}`."
    )


def _range_dimension(name: str, kind: type, spec: str) -> SearchDimension:
    low_text, high_text, *flags = spec.split(":")
    unknown = [f for f in flags if f not in ("log", "int")]
    if unknown:
        raise ConfigError(f"unknown range flag {unknown[0]!r}; the flags are log and int.")
    if kind not in (int, float):
        raise ConfigError(f"{name} is not a number; give choices A,B,... .")
    low, high = _number(low_text), _number(high_text)
    integer = kind is int or "int" in flags
    if integer and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"{name} takes integers, got {low_text} and {high_text}.")
    if not low < high:
        raise ConfigError(f"LOW must be below HIGH, got {low_text} and {high_text}.")
    log = "log" in flags
    if log and low <= 0:
        raise ConfigError(f"a log scale needs LOW > 0, got {low_text}.")
    return SearchDimension(name, low, high, log=log, integer=integer)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a number.") from None
    if not math.isfinite(value):
        raise ConfigError(f"{text!r} is not a finite number.")
    return value


def _choice_dimension(name: str, kind: type, choices: tuple | None, spec: str) -> SearchDimension:
    values = [_choice(kind, choices, item.strip()) for item in spec.split(",")]
    distinct = tuple(dict.fromkeys(values))
    if len(distinct) < 2:
        raise ConfigError("give at least two different choices.")
    return SearchDimension(name, choices=distinct)


def _choice(kind: type, choices: tuple | None, text: str) -> Any:
    if kind is bool:
        truth = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if text.lower() not in truth:
            raise ConfigError(f"{text!r} is not true or false.")
        return truth[text.lower()]
    if kind in (int, float):
        value = _number(text)
        if kind is int and not value.is_integer():
            raise ConfigError(f"{text!r} is not an integer.")
        return int(value) if kind is int else value
    if choices and text not in choices:
        raise ConfigError(f"{text!r} is not one of {', '.join(choices)}.")
    return text


def default_space(resolved: TrainConfig, fixed: Iterable[str] = ()) -> list[SearchDimension]:
    """The default search: each learning rate log-uniform over [default / 10, default * 10]
    (the outer one, and the method's own: inner, or fine-tuning), and the inner steps from 1
    to max(5, twice the default), for the options not in `fixed`."""
    fixed = set(fixed)
    rates = {"outer_lr": resolved.outer_lr, **resolved.settings.learning_rates()}
    space = [
        SearchDimension(name, rate / LEARNING_RATE_SPAN, rate * LEARNING_RATE_SPAN, log=True)
        for name, rate in rates.items()
        if name not in fixed and rate
    ]
    steps = getattr(resolved.settings, "inner_steps", None)
    if steps is not None and "inner_steps" not in fixed:
        high = max(MIN_INNER_STEPS_HIGH, 2 * steps)
        space.append(SearchDimension("inner_steps", 1, high, integer=True))
    return space


def search_space(
    base: dict, searches: Sequence[str] = (), fixed: Iterable[str] = (), device: str = "cpu"
) -> list[SearchDimension]:
    """The default space for the options absent from `base`, with the `--search` texts added
    or replacing defaults. Options named in `fixed` (given on the command line) cannot be
    searched; those only in `base` (a config file) can."""
    method = get_method(base.get("algorithm", TrainConfig.algorithm))
    custom = [parse_search(text, method) for text in searches]
    names = [dimension.name for dimension in custom]
    for dimension in custom:
        if names.count(dimension.name) > 1:
            raise ConfigError(f"`search` names {dimension.name} twice; give one range.")
        if dimension.name in set(fixed):
            flag = f"`{dimension.name}`"
            raise ConfigError(
                f"{flag} is given, so {dimension.name} is fixed; drop {flag} or its `search`."
            )
    resolved = TrainConfig.from_dict(without(base, names)).resolved(device)
    defaults = [d for d in default_space(resolved, fixed=base) if d.name not in names]
    space = defaults + custom
    if not space:
        raise ConfigError(
            "nothing to search: every learning rate and step count is given; drop one or add "
            "`search` NAME=LOW:HIGH."
        )
    return space


def without(values: dict, names: Iterable[str]) -> dict:
    names = set(names)
    return {k: v for k, v in values.items() if k not in names}


@dataclass(frozen=True)
class TrialPlan:
    """How a trial's sampled values become a training run."""

    base: dict  # the fixed options, less the searched ones
    space: list[SearchDimension]
    eval_steps_floor: int | None  # see `eval_steps_floor`
    device: str

    def settings(self, params: dict) -> dict:
        """The options a trial sets on top of `base`: its parameters, and the evaluation steps
        that follow a searched `inner_steps`."""
        settings = dict(params)
        if self.eval_steps_floor is not None and "inner_steps" in params:
            settings["eval_inner_steps"] = max(params["inner_steps"], self.eval_steps_floor)
        return settings

    def config(self, settings: dict) -> TrainConfig:
        return TrainConfig.from_dict({**self.base, **settings})

    def check(self) -> None:
        """Refuse, before any trial, a dimension whose edges make an invalid configuration
        (each checked with the other options at their defaults)."""
        for dimension in self.space:
            for value in dimension.extremes():
                try:
                    self.config(self.settings({dimension.name: value})).resolved(self.device)
                except ConfigError as error:
                    raise ConfigError(
                        f"searching {dimension.describe()}: with {dimension.name} = {value}, "
                        f"{error}"
                    ) from None


def eval_steps_floor(base: dict, space: Sequence[SearchDimension], resolved: TrainConfig):
    """With `inner_steps` searched and `eval_inner_steps` neither given nor searched, trials
    adapt at evaluation with max(inner_steps, the default evaluation steps): never fewer steps
    than in training, and the paper's test-time steps where it used more. None otherwise."""
    searched = {d.name for d in space}
    if "inner_steps" not in searched or "eval_inner_steps" in searched | set(base):
        return None
    # `inner_steps` is searched: a method with an inner loop
    return cast(InnerLoopSettings, resolved.settings).eval_inner_steps


def pruning_listener(trial: optuna.Trial, last_iteration: int) -> Listener:
    """Report each validation's best-so-far value (what the trial would score if it stopped
    now) to `trial`, and end the run when the pruner says so, or at once when the value is not
    finite (adaptation at evaluation diverged: the inner rate is too high for its steps). The
    last validation is not pruned: the trial has then cost all it will, and its result is
    complete."""
    optuna = import_optuna()
    best = None

    def listen(record: dict) -> None:
        nonlocal best
        if record.get("split") != "val":
            return
        metric, iteration = record["metric"], record["iteration"]
        if record.get("best") or best is None:
            best = record[metric]
        trial.report(best, iteration)
        if not math.isfinite(best):
            raise optuna.TrialPruned(evaluation_diverged(trial, metric, best, iteration))
        if iteration < last_iteration and trial.should_prune():
            note = f"pruned at iteration {iteration} ({metric} {format_metric(metric, best)})"
            trial.set_user_attr("note", note)
            raise optuna.TrialPruned(note)

    return listen


def run_trial(
    trial: optuna.Trial,
    plan: TrialPlan,
    study_dir: Path,
    data_root=None,
    download: bool = False,
) -> float:
    """Train the trial's run folder and return its best validation result. A diverged run is
    pruned (TPE then learns that its region is bad) with the reason as its note."""
    optuna = import_optuna()
    settings = plan.settings({d.name: d.suggest(trial) for d in plan.space})
    run_dir = study_dir / f"trial-{trial.number:04d}"
    trial.set_user_attr("settings", settings)
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("host", socket.gethostname())
    try:
        config = plan.config(settings)
        iterations = config.resolved(plan.device).iterations
        assert iterations is not None  # resolved
        listener = pruning_listener(trial, iterations)
        # train prints each validation even without a progress bar; the study prints a line
        # per trial instead
        with contextlib.redirect_stdout(io.StringIO()):
            _, _, best = train(
                config,
                run_dir,
                data_root,
                download,
                plan.device,
                progress=False,
                listeners=[listener],
            )
    except DivergenceError as error:
        note = str(error).split(";")[0]
        trial.set_user_attr("note", note)
        trial.set_user_attr("diverged", True)
        raise optuna.TrialPruned(note) from None
    except ConfigError as error:
        trial.set_user_attr("note", str(error))
        raise
    except (RunStopped, KeyboardInterrupt):
        trial.set_user_attr("note", f"stopped; fewshot train --resume {run_dir} finishes it")
        raise
    assert best is not None  # a finished run has validated (at its last iteration at least)
    return best.mean


def evaluation_diverged(trial: optuna.Trial, metric: str, value: float, iteration: int) -> str:
    """Mark the trial diverged at evaluation; the note says so."""
    note = f"validation {metric} is {value} at iteration {iteration}: adaptation diverged"
    trial.set_user_attr("note", note)
    trial.set_user_attr("diverged", True)
    return note


def tune(
    base: dict,
    space: Sequence[SearchDimension],
    study_dir: Path,
    trials: int | None = 20,
    storage: str | None = None,
    study_name: str | None = None,
    data_root=None,
    download: bool = False,
    device: str = "cpu",
    seed: int | None = None,
    timeout: float | None = None,
    prune_after: int | None = PRUNE_AFTER,
    pruner: optuna.pruners.BasePruner | None = None,
    log: Callable[[str], None] | None = None,
    command_arguments: Sequence[str] = (),
) -> optuna.Study:
    """Run `trials` trials (or until `timeout` minutes have passed) of the study `study_name`
    in `storage`, creating it or continuing it, and return it.

    Each trial meta-trains `study_dir/trial-NNNN` with the `base` options (a flat dict as
    `TrainConfig.from_dict` takes) and the values drawn from `space`; its value is the run's
    best validation result (MSE minimised, accuracy maximised). The sampler is TPE seeded from
    `seed` (default: the training seed) and the number of trials already in the study, so that
    a continued study draws new values. Unless `pruner` is given, a median pruner stops a
    trial whose validation is worse than the median of the completed trials' at the same
    iteration, from the second validation on and once `prune_after` trials have completed
    (None: never). `log` receives a line per finished trial; `command_arguments` are added to
    the best command (e.g. --threads).
    """
    optuna = import_optuna()
    study_dir = Path(study_dir)
    names = [d.name for d in space]
    base = without(base, names)
    resolved = TrainConfig.from_dict(base).resolved(device)
    plan = TrialPlan(base, list(space), eval_steps_floor(base, space, resolved), device)
    plan.check()
    build_sources(resolved, data_root, download)  # missing data: one line, nothing written
    study_name = study_name or study_dir.resolve().name
    check_study_folder(study_dir, study_name)
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(study_dir)
    metric = "mse" if resolved.problem.regression else "accuracy"
    study = open_study(storage, study_name, metric, pruner or median_pruner(resolved, prune_after))
    check_no_stale_trials(study, study_dir)
    record_study(study, study_dir, plan, resolved, metric, storage)
    seed = resolved.seed if seed is None else seed
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(seed, len(trials_of(study))))
    extra = [*data_arguments(data_root, download, device), *command_arguments]
    if log is not None:
        log(f"device: {describe_device(device)}")
        log(f"searching {'; '.join(dimension.describe() for dimension in space)}")

    bar = progress_bar(desc="tuning", total=trials, unit="trial", disable=log is None)

    def after_trial(study: Study, trial: FrozenTrial) -> None:
        if log is not None:
            with bar.external_write_mode():
                log(trial_line(trial, metric))
        bar.update(1)
        write_best(study, study_dir, plan, extra)

    try:
        with bar:
            study.optimize(
                lambda trial: run_trial(trial, plan, study_dir, data_root, download),
                n_trials=trials,
                timeout=None if timeout is None else 60 * timeout,
                catch=(ConfigError,),
                callbacks=[after_trial],
            )
    except (RunStopped, KeyboardInterrupt):
        write_best(study, study_dir, plan, extra)
        finished = len(trials_of(study, FINISHED))
        raise RunStopped(
            f"the study's {finished} finished trials are kept in {hide_password(storage)}; "
            "run the same command again to continue it."
        ) from None
    write_best(study, study_dir, plan, extra)  # trials of other processes may have finished
    return study


def sampler_seed(seed: int, trials_before: int) -> int:
    """The TPE sampler's seed for a process that finds `trials_before` trials in the study.

    A sampler seeded alike in a continued study (or in two processes) would draw the same
    first values again; mixing in the count, and hashing the pair so that neighbouring seeds
    and counts do not meet, keeps the draws apart while a study stays reproducible.
    """
    return int(np.random.SeedSequence([seed % 2**32, trials_before]).generate_state(1)[0])


def default_storage(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


def hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    with contextlib.suppress(Exception):  # not a URL sqlalchemy reads: shown as given
        return make_url(url).render_as_string(hide_password=True)
    return url


def median_pruner(resolved: TrainConfig, prune_after: int | None) -> optuna.pruners.BasePruner:
    """Median pruning from the second validation on (the first is noisy and a slow start is
    not a bad setting), once `prune_after` trials have completed; None: no pruning."""
    optuna = import_optuna()
    if prune_after is None:
        return optuna.pruners.NopPruner()
    assert resolved.val_every is not None  # resolved
    return optuna.pruners.MedianPruner(
        n_startup_trials=prune_after, n_warmup_steps=resolved.val_every + 1
    )


def open_study(storage: str, study_name: str, metric: str, pruner) -> optuna.Study:
    """Create the study or load it; a trial whose process died is failed after a while."""
    optuna = import_optuna()
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with warnings.catch_warnings():  # the heartbeat is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_SECONDS)
        study = optuna.create_study(
            storage=rdb,
            study_name=study_name,
            direction="maximize" if metric == "accuracy" else "minimize",
            pruner=pruner,
            load_if_exists=True,
        )
    except (SQLAlchemyError, ImportError, ValueError) as error:
        raise ConfigError(f"cannot open the storage {hide_password(storage)}: {error}") from None
    return study


def record_study(
    study: optuna.Study,
    study_dir: Path,
    plan: TrialPlan,
    resolved: TrainConfig,
    metric: str,
    storage: str,
) -> None:
    """Keep what the study fixes and searches, in the storage and in `study_dir/study.json`;
    a continued study must fix and search the same, or its trials would not compare."""
    searched = {d.name for d in plan.space}
    if plan.eval_steps_floor is not None:
        searched.add("eval_inner_steps")
    fixed = without(resolved.to_dict(), searched | set(SPEED_SETTINGS))
    settings = json.loads(
        json.dumps({"metric": metric, "fixed": fixed, "search": [asdict(d) for d in plan.space]})
    )
    if "fixed" not in study.user_attrs:
        for key, value in settings.items():
            study.set_user_attr(key, value)
    differences = [
        describe_difference(key, study.user_attrs.get(key), value)
        for key, value in settings.items()
        if study.user_attrs.get(key) != value
    ]
    if differences:
        raise ConfigError(
            f"the study {study.study_name!r} in {hide_password(storage)} was run with other "
            f"settings ({'; '.join(differences)}); give the same options to continue it, or "
            "start another with `study_name` or `study_dir`."
        )
    document = {"study_name": study.study_name, "storage": hide_password(storage), **settings}
    text = json.dumps(document, indent=2) + "\n"
    atomic_write_text(study_dir / STUDY_FILE, text)


def check_no_stale_trials(study: optuna.Study, study_dir: Path) -> None:
    """Refuse a study folder holding trial run folders that the study's storage does not know
    (its study.db deleted, or another storage given): each new trial would find its folder
    taken."""
    known = {f"trial-{t.number:04d}" for t in study.trials}
    stale = sorted(p.name for p in study_dir.glob("trial-*") if p.name not in known)
    if stale:
        raise ConfigError(
            f"{study_dir} holds trial folders its study's storage does not know ({stale[0]}, ...); "
            "use a new `study_dir`, or the `storage` that made them."
        )


def check_study_folder(study_dir: Path, study_name: str) -> None:
    """One study per folder: the run folders of two would collide."""
    path = study_dir / STUDY_FILE
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8")).get("study_name")
        if recorded != study_name:
            raise ConfigError(
                f"{study_dir} holds the study {recorded!r}; continue it with "
                f"`study_name={recorded}`, or give another `study_dir`."
            )


def describe_difference(key: str, before, now) -> str:
    if key == "fixed" and isinstance(before, dict):
        names = sorted(n for n in {*before, *now} if before.get(n) != now.get(n))
        return ", ".join(f"{n} {before.get(n)} (now {now.get(n)})" for n in names)
    if key == "search" and isinstance(before, list):
        return f"searched {describe_space(before)} (now {describe_space(now)})"
    return f"{key} {before} (now {now})"


def describe_space(dimensions: list[dict]) -> str:
    return "; ".join(SearchDimension(**d).describe() for d in dimensions)


def trials_of(study: optuna.Study, states: Sequence[str] | None = None) -> list:
    """The study's trials (FrozenTrial), all or those in the states named ("COMPLETE", ...)."""
    if states is None:
        return study.get_trials(deepcopy=False)
    optuna = import_optuna()
    wanted = tuple(optuna.trial.TrialState[state] for state in states)
    return study.get_trials(deepcopy=False, states=wanted)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best completed trial, or None before any has completed."""
    if not trials_of(study, ("COMPLETE",)):
        return None
    return study.best_trial


def data_arguments(data_root, download: bool, device: str) -> list[str]:
    """The command-line options for where the data is and what trains, as given."""
    arguments = [] if data_root is None else ["--data-root", str(data_root)]
    arguments += ["--download"] * download
    return arguments + ([] if device == "cpu" else ["--device", device])


def option_arguments(values: dict) -> list[str]:
    """`fewshot train` options that set `values` (TrainConfig names; None: the default), in
    the order of the configuration's fields."""
    config = TrainConfig.from_dict(values)
    order = [*run_setting_names(), *(f.name for f in fields(config.settings))]
    arguments = []
    for name in sorted(values, key=order.index):
        flag, value = name.replace("_", "-"), values[name]
        if value is None:
            continue
        if isinstance(value, bool):
            arguments.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            arguments += [f"--{flag}", repr(value) if isinstance(value, float) else str(value)]
    return arguments


def best_command(
    plan: TrialPlan, settings: dict, out: Path, extra_arguments: Sequence[str] = ()
) -> str:
    """The `fewshot train` command that trains the run a trial with `settings` trained."""
    arguments = option_arguments({**plan.base, **settings})
    return shlex.join(["fewshot", "train", *arguments, *extra_arguments, "--out", str(out)])


def write_best(
    study: optuna.Study, study_dir: Path, plan: TrialPlan, extra_arguments: Sequence[str] = ()
) -> None:
    """Write `best.json` and `best-command.txt` for the best completed trial so far (each
    file whole or not at all, so an interrupted study leaves the last complete ones)."""
    trial = best_trial(study)
    if trial is None:
        return
    settings = trial.user_attrs["settings"]
    command = best_command(plan, settings, study_dir / "best", extra_arguments)
    best = {
        "study_name": study.study_name,
        "trial": trial.number,
        "metric": study.user_attrs.get("metric"),
        "value": trial.value,
        "params": trial.params,
        "settings": settings,
        "run_dir": trial.user_attrs.get("run_dir"),
        "command": command,
    }
    text = json.dumps(best, indent=2) + "\n"
    atomic_write_text(study_dir / BEST_FILE, text)
    atomic_write(
        study_dir / BEST_COMMAND_FILE,
        lambda tmp: Path(tmp).write_text(command + "\n", encoding="utf-8"),
    )


def format_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4f}"


def format_param(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_state(trial: optuna.trial.FrozenTrial) -> str:
    if trial.user_attrs.get("diverged"):
        return "diverged"
    return "failed" if trial.state.name == "FAIL" else trial.state.name.lower()


def trial_line(trial: optuna.trial.FrozenTrial, metric: str) -> str:
    """One line for a finished trial: number, state, value, parameters, run folder, note."""
    params = ", ".join(f"{k}={format_param(v)}" for k, v in trial.params.items())
    value = f": {metric} {format_metric(metric, trial.value)}" if trial.value is not None else ""
    note = trial.user_attrs.get("note")
    run_dir = trial.user_attrs.get("run_dir", "")
    return f"trial {trial.number} {trial_state(trial)}{value} ({params}) {run_dir}" + (
        f"; {note}" if note else ""
    )


def trials_table(study: optuna.Study) -> str:
    """A table of every trial: number, state, value, each parameter, run folder (with its
    machine, where several share the study) and note."""
    metric = study.user_attrs.get("metric", "value")
    names = [d["name"] for d in study.user_attrs.get("search", [])]
    trials = trials_of(study)
    notes = any("note" in t.user_attrs for t in trials)
    several_hosts = len({t.user_attrs.get("host") for t in trials}) > 1
    header = ["trial", "state", metric, *names, "run folder", *["note"] * notes]
    rows = [
        [
            str(t.number),
            trial_state(t),
            format_metric(metric, t.value),
            *(format_param(t.params[n]) if n in t.params else "-" for n in names),
            f"{t.user_attrs.get('host')}:" * several_hosts + t.user_attrs.get("run_dir", "-"),
            *[t.user_attrs.get("note", "")] * notes,
        ]
        for t in trials
    ]
    return format_table(header, rows)


def best_summary(study: optuna.Study, study_dir: Path) -> str:
    """The best trial's value and settings, and where its command is written."""
    trial = best_trial(study)
    if trial is None:
        return "no trial has completed yet."
    metric = study.user_attrs.get("metric", "value")
    settings = ", ".join(f"{k}={v!r}" for k, v in trial.user_attrs["settings"].items())
    command = json.loads((Path(study_dir) / BEST_FILE).read_text(encoding="utf-8"))["command"]
    return (
        f"best: trial {trial.number}, validation {metric} {format_metric(metric, trial.value)}"
        f" ({trial.user_attrs.get('run_dir')})\n"
        f"best settings: {settings}\n"
        f"best command (in {Path(study_dir) / BEST_COMMAND_FILE}):\n{command}"
    )
