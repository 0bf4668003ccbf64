"""Figures of a run folder (`fewshot plot`): training curves, the adaptation curve, MAML's
sinusoid figure and one classified test episode.

Each figure has a function that computes its numbers, on the evaluation protocol's episodes
(`training.evaluation`), and one that draws them. matplotlib (the `plot` extra) is imported
only to draw, so `import fewshot` does not need it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from fewshot.algorithms import Algorithm, get_method
from fewshot.algorithms.gradient import GradientLearner
from fewshot.datasets.registry import get_dataset
from fewshot.datasets.sinusoid import INPUT_RANGE, SinusoidTasks, sinusoid
from fewshot.errors import FewshotError
from fewshot.tasks import Task, stream_generator
from fewshot.training import checkpoint
from fewshot.training.config import TrainConfig
from fewshot.training.evaluation import EPISODES_PER_DRAW, evaluate, inner_steps, prediction_mode
from fewshot.training.factory import EpisodeSampler, build_algorithm
from fewshot.training.loading import load_run

TRAINING_METRICS = ("loss", "accuracy", "inner_loss")
MISSING_MATPLOTLIB = "fewshot plot needs matplotlib: pip install 'fewshot[plot]'"
DPI = 100

# -- training curves -------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationCurve:
    """The validations of a run: mean and 95% CI half-width at each, and the iteration whose
    weights the run kept (the best)."""

    metric: str
    iterations: list[int]
    mean: list[float]
    ci95: list[float]
    episodes: int
    inner_steps: int | None
    best_iteration: int | None


@dataclass(frozen=True)
class TrainingCurves:
    """The training lines of metrics.jsonl: each metric logged ("loss", and where the method
    logs them "accuracy" and "inner_loss") at `iterations`, NaN where a line lacks it."""

    iterations: list[int]
    metrics: dict[str, list[float]]
    validation: ValidationCurve | None


def read_training_curves(run_dir: Path) -> TrainingCurves:
    """Training and validation curves of a run, as logged."""
    records = checkpoint.read_metrics(run_dir)
    train = [r for r in records if "split" not in r]
    logged = [name for name in TRAINING_METRICS if any(name in r for r in train)]
    metrics = {name: [float(r.get(name, math.nan)) for r in train] for name in logged}
    return TrainingCurves(
        [r["iteration"] for r in train],
        metrics,
        _validation_curve([r for r in records if r.get("split") == "val"]),
    )


def _validation_curve(records: list[dict]) -> ValidationCurve | None:
    if not records:
        return None
    best = [r["iteration"] for r in records if r.get("best")]
    return ValidationCurve(
        metric=records[-1]["metric"],
        iterations=[r["iteration"] for r in records],
        mean=[r[r["metric"]] for r in records],
        ci95=[r["ci95"] for r in records],
        episodes=records[-1]["episodes"],
        inner_steps=records[-1].get("inner_steps"),
        best_iteration=best[-1] if best else None,
    )


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Mean of each value and the `window - 1` before it (fewer at the start): a training
    loss logged every few iterations is too noisy to read raw."""
    array = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(array, 0, 0.0))
    ends = np.arange(1, len(array) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


# -- the adaptation curve --------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptationCurve:
    """A model's query score (accuracy, or MSE for regression) after each number of inner
    steps: mean and 95% CI half-width over the same evaluation episodes."""

    label: str
    metric: str
    steps: list[int]
    mean: list[float]
    ci95: list[float]


def adaptation_curve(
    algorithm: Algorithm,
    sampler,
    steps: Sequence[int],
    episodes: int,
    seed: int,
    label: str = "",
    device: torch.device | str = "cpu",
) -> AdaptationCurve:
    """`evaluate` after each number of inner steps in `steps`, every point on the episodes of
    `seed`, so the points differ only by the steps. A method that takes no gradient steps is
    evaluated once, and that result holds for every number of steps."""
    if algorithm.adapts_by_steps:
        results = [evaluate(algorithm, sampler, episodes, seed, s, device) for s in steps]
    else:
        results = [evaluate(algorithm, sampler, episodes, seed, None, device)] * len(steps)
    return AdaptationCurve(
        label,
        results[0].metric,
        list(steps),
        [r.mean for r in results],
        [r.ci95 for r in results],
    )


def step_grid(most: int, points: int = 21) -> list[int]:
    """0..most: every step where that is at most `points` of them, else about `points` spaced
    evenly in log(1 + s), since each point costs an evaluation of that many steps."""
    if most < points:
        return list(range(most + 1))
    spaced = np.rint(np.expm1(np.linspace(0.0, np.log1p(most), points))).astype(int)
    return sorted({0, most, *spaced.tolist()})


def random_initialisation(config: TrainConfig) -> Algorithm:
    """The run's method and network as they were before meta-training: built with torch seeded
    by the run's seed, as training built them; the global random state is left unchanged."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_algorithm(config)


# -- one test episode ------------------------------------------------------------------------


def first_test_episode(sampler, seed: int) -> Task:
    """The first episode that `evaluate` draws with `seed`, with a leading task dimension of 1:
    the figures show an episode of the evaluation that `fewshot eval --seed` reports."""
    return sampler.sample(EPISODES_PER_DRAW, stream_generator("eval", seed))[:1]


@dataclass(frozen=True)
class EpisodePredictions:
    """One classification episode (no task dimension) and the class predicted for each query."""

    episode: Task
    predicted: torch.Tensor

    @property
    def correct(self) -> torch.Tensor:
        return self.predicted == self.episode.query_y

    @property
    def accuracy(self) -> float:
        return self.correct.float().mean().item()


def predict_test_episode(algorithm: Algorithm, sampler, seed: int) -> EpisodePredictions:
    """The method's predictions (the run's own inner steps) on the first test episode."""
    episode = first_test_episode(sampler, seed)
    with prediction_mode(algorithm, seed):
        logits = algorithm.predict(episode)
    return EpisodePredictions(episode[0], logits[0].argmax(-1))


# -- sinusoid fits ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SinusoidTask:
    """A test task (leading task dimension of 1) with the amplitude and phase of its function."""

    task: Task
    amplitude: float
    phase: float


def sinusoid_test_task(sampler: SinusoidTasks, seed: int) -> SinusoidTask:
    """The first episode that `evaluate` draws with `seed`, with its function."""
    tasks, amplitude, phase = sampler.sample_with_functions(
        EPISODES_PER_DRAW, stream_generator("eval", seed)
    )
    return SinusoidTask(tasks[:1], amplitude[0].item(), phase[0].item())


@dataclass(frozen=True)
class SinusoidFit:
    """A model's predictions over `x` after each number of steps on one task's support points,
    and the task's true function there."""

    label: str
    x: np.ndarray
    truth: np.ndarray
    support_x: np.ndarray
    support_y: np.ndarray
    predictions: dict[int, np.ndarray]

    def mse(self, steps: int) -> float:
        """Mean squared error against the true function over `x`."""
        return float(np.mean((self.predictions[steps] - self.truth) ** 2))


def sinusoid_fit(
    algorithm: Algorithm,
    test_task: SinusoidTask,
    steps: Sequence[int],
    seed: int,
    label: str = "",
    points: int = 200,
) -> SinusoidFit:
    """Adapt to the task's support points with each number of `steps` and predict the whole
    input range, as Finn et al. (2017) show in their Figure 2."""
    task = test_task.task
    x = torch.linspace(*INPUT_RANGE, points).view(1, points, 1)
    predictions = {}
    for s in steps:
        with prediction_mode(algorithm, seed):
            predictions[s] = algorithm.adapt(task.support_x, task.support_y, s)(x)[0, :, 0]
    return SinusoidFit(
        label,
        x[0, :, 0].numpy(),
        sinusoid(x, test_task.amplitude, test_task.phase)[0, :, 0].numpy(),
        task.support_x[0, :, 0].numpy(),
        task.support_y[0, :, 0].numpy(),
        {s: p.numpy() for s, p in predictions.items()},
    )


# -- drawing ---------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Refuse in one line, before any work, when the `plot` extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FewshotError(MISSING_MATPLOTLIB) from None


def new_figure(width: float, height: float):
    """A figure drawn by the Agg renderer, outside pyplot: no display, no global state."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def draw_training_curves(
    curves: TrainingCurves,
    path: Path,
    title: str,
    training_title: str = "Training",
    loss_label: str = "loss",
) -> Path:
    """Training loss (raw, faint, and smoothed) beside the validation score with its 95% CI
    band and the kept (best) checkpoint; a classification run's training accuracy joins the
    validation accuracy."""
    figure = new_figure(11, 5.2)
    loss_axes, score_axes = figure.subplots(1, 2)
    window = max(1, len(curves.iterations) // 25)
    iterations = np.asarray(curves.iterations)
    losses = np.asarray(curves.metrics.get("loss", []))
    _draw_noisy(loss_axes, iterations, losses, window, "C0", loss_label)
    if "inner_loss" in curves.metrics:
        support = curves.metrics["inner_loss"]
        label = "support loss before the last inner step"
        _draw_noisy(loss_axes, iterations, support, window, "C2", label)
    if len(losses) and np.nanmin(losses) > 0 and np.nanmax(losses) > 20 * np.nanmin(losses):
        _readable_log_axis(loss_axes)
    loss_axes.set(xlabel="iteration", ylabel="loss", title=training_title)
    _legend_below(loss_axes)
    loss_axes.grid(alpha=0.3)
    _draw_validation(score_axes, curves, window)
    figure.suptitle(title)
    return save_figure(figure, path)


def _draw_noisy(axes, x, values, window: int, color: str, label: str) -> None:
    """Values as logged (faint) and their moving average, labelled with its span."""
    if not len(values):
        return
    if window > 1:
        axes.plot(x, values, color=color, alpha=0.25, linewidth=0.8)
        span = window * int(x[1] - x[0]) if len(x) > 1 else window
        label = f"{label}, smoothed over {span} iterations"
    axes.plot(x, moving_average(values, window), color=color, label=label)


def _draw_validation(axes, curves: TrainingCurves, window: int) -> None:
    validation = curves.validation
    if validation is None:
        axes.text(0.5, 0.5, "no validation results", ha="center", transform=axes.transAxes)
        return
    percent = validation.metric == "accuracy"
    scale = 100.0 if percent else 1.0
    if percent and "accuracy" in curves.metrics:
        training = scale * np.asarray(curves.metrics["accuracy"])
        iterations = np.asarray(curves.iterations)
        _draw_noisy(axes, iterations, training, window, "C0", "training accuracy")
    x = np.asarray(validation.iterations)
    mean, ci = scale * np.asarray(validation.mean), scale * np.asarray(validation.ci95)
    steps = "" if validation.inner_steps is None else f", {inner_steps(validation.inner_steps)}"
    label = f"validation ({validation.episodes} episodes{steps}) ± 95% CI"
    axes.plot(x, mean, "o-", color="C3", markersize=4, label=label)
    axes.fill_between(x, mean - ci, mean + ci, color="C3", alpha=0.2)
    if validation.best_iteration is not None:
        best = validation.iterations.index(validation.best_iteration)
        label = f"kept checkpoint (iteration {validation.best_iteration})"
        axes.plot(x[best], mean[best], "*", color="k", markersize=14, label=label)
    if not percent and mean.min() > 0 and mean.max() > 20 * mean.min():
        _readable_log_axis(axes)
    name = "accuracy (%)" if percent else validation.metric.upper()
    axes.set(xlabel="iteration", ylabel=name, title="Validation")
    _legend_below(axes)
    axes.grid(alpha=0.3)


def _legend_below(axes, columns: int = 1) -> None:
    """The legend under the axes, where it hides no curve whatever the data."""
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=columns, fontsize=9)


def draw_adaptation(
    curves: Sequence[AdaptationCurve],
    path: Path,
    title: str,
    evaluated_steps: int | None = None,
    chance: float | None = None,
) -> Path:
    """Score against inner steps, one line and 95% CI band per model, the legend below; MSE
    on a log axis, where the first steps' drop spans orders of magnitude."""
    figure = new_figure(7.5, 5.6)
    axes = figure.subplots()
    percent = curves[0].metric == "accuracy"
    scale = 100.0 if percent else 1.0
    for curve, color in zip(curves, ["C0", "C7", "C1", "C2", "C4", "C5"]):
        steps = np.asarray(curve.steps)
        mean, ci = scale * np.asarray(curve.mean), scale * np.asarray(curve.ci95)
        # A band below zero has no place on a log axis; a tenth of the mean stands for it.
        lower = mean - ci if percent else np.maximum(mean - ci, mean / 10)
        axes.plot(steps, mean, "o-", color=color, markersize=3.5, label=curve.label)
        axes.fill_between(steps, lower, mean + ci, color=color, alpha=0.2)
    if chance is not None:
        axes.axhline(100 * chance, color="k", linestyle=":", linewidth=1, label="chance")
    most = max(curves[0].steps)
    if evaluated_steps is not None and 0 < evaluated_steps < most:
        label = f"the run's evaluation steps ({evaluated_steps})"
        axes.axvline(evaluated_steps, color="k", linestyle="--", linewidth=0.8, label=label)
    if most > 30:
        axes.set_xscale("symlog", linthresh=1)
    else:
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not percent:
        _readable_log_axis(axes)
    axes.set(
        xlabel="gradient steps on the support set",
        ylabel="query accuracy (%)" if percent else "query MSE",
        title=title,
    )
    axes.grid(alpha=0.3, which="both")
    figure.legend(loc="outside lower center", fontsize=9, title="mean ± 95% CI", ncols=1)
    return save_figure(figure, path)


def _readable_log_axis(axes) -> None:
    """A log y-axis labelled at 1, 2 and 5 times powers of ten, in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())


def draw_sinusoid(fits: Sequence[SinusoidFit], path: Path, title: str) -> Path:
    """Finn et al. (2017), Figure 2: per model, the true function, the support points and the
    predictions after each number of steps, on one y-scale."""
    figure = new_figure(6 * len(fits), 4.6)
    panels = np.atleast_1d(figure.subplots(1, len(fits), sharey=True, squeeze=False)[0])
    for axes, fit in zip(panels, fits):
        axes.plot(fit.x, fit.truth, color="tab:red", linewidth=2, label="true function")
        steps = sorted(fit.predictions)
        shades = ["#a1d99b", "#41ab5d", "#005a32", "#00441b"]
        styles = [":", "--", "-", "-"]
        for s, color, style in zip(steps, shades, styles):
            name = "before adaptation" if s == 0 else f"after {s} step{'s' * (s != 1)}"
            axes.plot(
                fit.x,
                fit.predictions[s],
                style,
                color=color,
                linewidth=2,
                label=f"{name} (MSE {fit.mse(s):.3g})",
            )
        axes.plot(
            fit.support_x,
            fit.support_y,
            "^",
            color="tab:purple",
            markersize=9,
            label=f"the {len(fit.support_x)} support points",
        )
        axes.set(xlabel="x", title=fit.label)
        axes.grid(alpha=0.3)
        _legend_below(axes, columns=2)
    panels[0].set_ylabel("y")
    figure.suptitle(title)
    return save_figure(figure, path)


def draw_episode(predictions: EpisodePredictions, path: Path, title: str) -> Path:
    """One row per class: its support images, then its queries framed green where predicted
    right and red where wrong, with the class predicted in a red box."""
    episode = predictions.episode
    ways = int(episode.support_y.max()) + 1
    support = [episode.support_x[episode.support_y == c] for c in range(ways)]
    queries = [torch.nonzero(episode.query_y == c).flatten().tolist() for c in range(ways)]
    shots, per_class = len(support[0]), max(len(q) for q in queries)
    cell, gap = 0.62, 0.4  # inches per image, and between support and queries (in images)
    images_width = cell * (shots + gap + per_class) + 0.9
    # At least wide enough for the title; the images of a small episode keep their size, in
    # the middle, between two empty columns.
    width = max(images_width, 8.0)
    margin = max((width - images_width) / (2 * cell), 0.01)
    lines = "\n".join(textwrap.fill(line, int(14 * width)) for line in title.splitlines())
    figure = new_figure(width, cell * ways + 0.6 + 0.2 * len(lines.splitlines()))
    ratios = [margin] + [1] * shots + [gap] + [1] * per_class + [margin]
    grid = figure.add_gridspec(ways, len(ratios), width_ratios=ratios)
    for row in range(ways):
        for column, image in enumerate(support[row]):
            axes = _image_axes(figure, grid[row, 1 + column], image, "0.5", 1)
            if column == 0:
                axes.set_ylabel(f"class {row + 1}", rotation=0, ha="right", va="center")
                if row == 0:
                    axes.set_title("support", loc="left", fontsize=10)
        for column, query in enumerate(queries[row]):
            place = grid[row, 2 + shots + column]
            right = bool(predictions.correct[query])
            frame = "tab:green" if right else "tab:red"
            axes = _image_axes(figure, place, episode.query_x[query], frame, 3)
            if not right:
                _mark_predicted_class(axes, int(predictions.predicted[query]) + 1)
            if row == 0 and column == 0:
                axes.set_title("queries", loc="left", fontsize=10)
    figure.suptitle(lines, fontsize=10)
    return save_figure(figure, path)


def _mark_predicted_class(axes, number: int) -> None:
    axes.text(
        0.96,
        0.04,
        str(number),
        transform=axes.transAxes,
        ha="right",
        va="bottom",
        fontsize=8,
        color="white",
        bbox={"facecolor": "tab:red", "edgecolor": "none", "pad": 1.5},
    )


def _image_axes(figure, place, image: torch.Tensor, frame: str, width: float):
    axes = figure.add_subplot(place)
    pixels = image.clamp(0, 1)
    if pixels.shape[0] == 1:
        axes.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        axes.imshow(pixels.permute(1, 2, 0).numpy())
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_edgecolor(frame)
        spine.set_linewidth(width)
    return axes


# -- all figures of a run --------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedRun:
    """A run folder's configuration, best weights and test-episode sampler (`load_run`)."""

    path: Path
    config: TrainConfig
    algorithm: Algorithm
    test: EpisodeSampler

    @classmethod
    def load(
        cls, path: Path, data_root: Path | None = None, trust_backbone: bool = False
    ) -> LoadedRun:
        config, algorithm, sources = load_run(path, data_root, trust_backbone=trust_backbone)
        assert sources.test is not None  # the part `load_run` builds
        return cls(Path(path), config, algorithm, sources.test)

    @property
    def label(self) -> str:
        return f"{self.config.algorithm} ({self.path})"


def write_plots(
    run_dir: Path,
    out: Path | None = None,
    baseline: Path | None = None,
    data_root: Path | None = None,
    steps: int = 10,
    episodes: int = 100,
    seed: int = 0,
    report: Callable[[str], None] = print,
    trust_backbone: bool = False,
) -> list[Path]:
    """Write a run's figures to `out` (default RUN_DIR/plots) and return their paths.

    curves.png always; adaptation.png for methods that adapt by gradient steps (0..`steps`
    steps on `episodes` test episodes of `seed`: the run, its random initialisation, and the
    `baseline` run if given); sinusoid.png for sinusoid runs (the run and the baseline beside
    it after 0, 1 and `steps` steps); episode.png for image classification runs. The baseline must
    be evaluated on the same episodes (the command line checks). `report` gets a line for
    each file written or figure skipped. `trust_backbone`: as `fewshot.load`'s.
    """
    require_matplotlib()
    run = LoadedRun.load(run_dir, data_root, trust_backbone)
    compared = None if baseline is None else LoadedRun.load(baseline, data_root, trust_backbone)
    out = run.path / "plots" if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def wrote(path: Path) -> None:
        written.append(path)
        report(f"wrote {path}")

    wrote(write_curves(run, out))
    if run.algorithm.adapts_by_steps:
        wrote(write_adaptation(run, compared, out, steps, episodes, seed, report))
    else:
        name = run.config.algorithm
        report(f"adaptation.png: not drawn, {name} takes no gradient steps at test time")
    dataset = get_dataset(run.config.dataset)
    if dataset.regression:
        wrote(write_sinusoid(run, compared, out, steps, seed))
        if compared is None:
            report(
                "sinusoid.png: add --baseline RUN (e.g. a `fewshot train --algorithm finetune` "
                f"run with K = {run.config.shots}) to draw a pretrained and fine-tuned model "
                "beside it"
            )
    elif not dataset.images:
        report("episode.png: not drawn, a table's rows are not images")
    else:
        wrote(write_episode(run, out, seed))
    return written


def write_curves(run: LoadedRun, out: Path) -> Path:
    config = run.config
    title = f"{run.label}: {describe_task(config)}"
    curves = read_training_curves(run.path)
    training_title = f"Training ({training_data(config)})"
    return draw_training_curves(
        curves, out / "curves.png", title, training_title, training_loss_label(config)
    )


def write_adaptation(
    run: LoadedRun,
    compared: LoadedRun | None,
    out: Path,
    steps: int,
    episodes: int,
    seed: int,
    report: Callable[[str], None],
) -> Path:
    config, grid = run.config, step_grid(steps)
    untrained = f"{config.algorithm}, random initialisation (seed {config.seed})"
    models = [
        (f"{run.label}, meta-learned", run.algorithm),
        (untrained, random_initialisation(config)),
    ]
    if compared is not None:
        models.append((compared.label, compared.algorithm))
    report(
        f"adaptation curve: {len(models)} models, {len(grid)} step counts up to {steps}, "
        f"{episodes} test episodes each"
    )
    curves = [
        adaptation_curve(model, run.test, grid, episodes, seed, label) for label, model in models
    ]
    evaluated = evaluation_steps(run)
    chance = None if get_dataset(config.dataset).regression else 1 / config.ways
    title = f"Adaptation, {describe_task(config)}: {episodes} test episodes (seed {seed})"
    return draw_adaptation(curves, out / "adaptation.png", title, evaluated, chance)


def write_sinusoid(
    run: LoadedRun, compared: LoadedRun | None, out: Path, steps: int, seed: int
) -> Path:
    test_task = sinusoid_test_task(cast(SinusoidTasks, run.test), seed)  # regression: sinusoids
    counts = sorted({0, 1, steps})
    models = [run] if compared is None else [run, compared]
    fits = [sinusoid_fit(m.algorithm, test_task, counts, seed, m.label) for m in models]
    low, high = INPUT_RANGE
    title = (
        f"First test task of seed {seed}: y = {test_task.amplitude:.2f} sin(x − "
        f"{test_task.phase:.2f}), K = {run.config.shots}; MSE against the true function on "
        f"[{low:g}, {high:g}]"
    )
    return draw_sinusoid(fits, out / "sinusoid.png", title)


def write_episode(run: LoadedRun, out: Path, seed: int) -> Path:
    predictions = predict_test_episode(run.algorithm, run.test, seed)
    correct, total = int(predictions.correct.sum()), len(predictions.predicted)
    steps = evaluation_steps(run)
    after = "" if steps is None else f" after {inner_steps(steps)}"
    title = (
        f"{run.label}, {describe_task(run.config)}\n"
        f"first test episode of seed {seed}{after}: {correct}/{total} queries right "
        f"({100 * predictions.accuracy:.1f}%)\n"
        "rows: classes; left: support; right: queries, framed green if right, red if wrong "
        "(with the class predicted)"
    )
    return draw_episode(predictions, out / "episode.png", title)


def evaluation_steps(run: LoadedRun) -> int | None:
    """The inner steps with which the run is evaluated; None for methods without any."""
    algorithm = run.algorithm
    if not algorithm.adapts_by_steps:
        return None
    ways = 1 if get_dataset(run.config.dataset).regression else run.config.ways
    assert run.config.shots is not None  # a run's recorded configuration is resolved
    # A method that adapts by steps is a `GradientLearner`.
    return cast(GradientLearner, algorithm).evaluation_steps(ways * run.config.shots)


def describe_task(config: TrainConfig) -> str:
    if get_dataset(config.dataset).regression:
        return f"sinusoid regression, K = {config.shots}"
    return f"{config.dataset} {config.ways}-way {config.shots}-shot"


def training_data(config: TrainConfig) -> str:
    """What a training line averages over, which is not what validation averages over."""
    if get_method(config.algorithm).algorithm.training_data == "examples":
        return f"pretraining batches of {config.meta_batch} examples"
    count = config.meta_batch
    if get_dataset(config.dataset).regression:
        return f"{count} task{'s' * (count != 1)} per iteration"
    return f"{count} {config.train_ways}-way episode{'s' * (count != 1)} per iteration"


def training_loss_label(config: TrainConfig) -> str:
    """What the training loss of the run's method is: not the same thing for every method."""
    steps = getattr(config.settings, "inner_steps", None)
    return get_method(config.algorithm).algorithm.training_loss_label(steps)
