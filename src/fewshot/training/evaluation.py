"""The few-shot evaluation protocol: held-out classes, many episodes, mean and 95% interval."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import cast

import torch

from fewshot.algorithms.base import Algorithm
from fewshot.algorithms.gradient import GradientLearner
from fewshot.datasets.registry import get_dataset
from fewshot.errors import require_positive
from fewshot.progress import progress_bar
from fewshot.tasks import stream_generator
from fewshot.training.config import TrainConfig, applies
from fewshot.training.feature_cache import cached_backbone, can_cache, on_features, skipped

# Episodes are drawn in fixed-size chunks from a generator seeded with the evaluation seed, so
# every model evaluated with the same seed sees exactly the same episodes.
EPISODES_PER_DRAW = 25


@dataclass(frozen=True)
class EvalResult:
    """Mean per-episode score and its 95% confidence half-width, 1.96 * std / sqrt(episodes)."""

    metric: str  # "accuracy" for classification, "mse" for regression
    mean: float
    ci95: float
    episodes: int
    inner_steps: int | None

    def to_dict(self) -> dict:
        """As `--json` prints it: the mean under the metric's name (`"accuracy"` or
        `"mse"`)."""
        out = asdict(self)
        out[self.metric] = out.pop("mean")
        return out

    @classmethod
    def from_dict(cls, values: dict) -> EvalResult:
        """The inverse of `to_dict`."""
        values = dict(values)
        values["mean"] = values.pop(values["metric"])
        return cls(**values)

    def __str__(self) -> str:
        steps = "" if self.inner_steps is None else f" after {inner_steps(self.inner_steps)}"
        if self.metric == "accuracy":
            value, spread = f"{100 * self.mean:.2f}%", f"{100 * self.ci95:.2f}%"
        else:
            value, spread = f"{self.mean:.4f}", f"{self.ci95:.4f}"
        if self.episodes < 2:  # one score has no spread: say so rather than print "± nan"
            return f"{self.metric} {value} (1 episode: too few for a confidence interval){steps}"
        return f"{self.metric} {value} ± {spread} (95% CI, {self.episodes} episodes){steps}"


def inner_steps(count: int) -> str:
    """ "1 inner step", "5 inner steps"."""
    return f"{count} inner step{'s' * (count != 1)}"


def episode_scores(predictions: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
    """Per-episode accuracy (integer labels) or mean squared error (real targets)."""
    if query_y.is_floating_point():
        return (predictions - query_y).pow(2).flatten(1).mean(1)
    return (predictions.argmax(-1) == query_y).float().mean(1)


def evaluate(
    algorithm: Algorithm,
    tasks,
    episodes: int = 600,
    seed: int = 0,
    inner_steps: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    stream: str = "eval",
    cache_features: bool = True,
) -> EvalResult:
    """Evaluate on `episodes` episodes drawn from `tasks` (a sampler of held-out classes);
    `progress` shows a progress bar; `cache_features` as `evaluate_episodes`'."""
    return evaluate_episodes(
        algorithm, tasks, episodes, seed, inner_steps, device, progress, stream, cache_features
    )[0]


def evaluate_episodes(
    algorithm: Algorithm,
    tasks,
    episodes: int = 600,
    seed: int = 0,
    inner_steps: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    stream: str = "eval",
    cache_features: bool = True,
) -> tuple[EvalResult, torch.Tensor]:
    """`evaluate`'s result and each episode's accuracy (or MSE), float64, in the order the
    episodes are drawn (for paired comparisons).

    The episodes come from `stream` and `seed` alone, so two models evaluated with one seed
    are scored on the same episodes; meta-test episodes come from the "eval" stream, the
    training loop's validation episodes from the "val" stream, so that no seed given to
    `fewshot eval` evaluates on the validation tasks (sinusoid tasks share one distribution).
    Random numbers that prediction itself draws (fine-tuning mini-batches,
    the order in which a support set is read) come from torch's generator seeded from `seed`
    too, and the caller's generator state is left as it was.

    Where the method's backbone is frozen whole and the episodes will pass more images through
    it than `tasks` holds, each image's features are computed once (`feature_cache`), unless
    `cache_features=False`.
    """
    require_positive(episodes=episodes)
    # F fine-tunes on each episode's images, which features cannot stand for; and features
    # pay only where the episodes pass more images through the backbone than `tasks` holds
    fine_tunes = getattr(algorithm, "support_fine_tuning", None) is not None
    worth_it = cache_features and not fine_tunes and can_cache(tasks)
    worth_it = worth_it and episodes * examples_per_episode(tasks) > len(tasks.inputs)
    backbone = cached_backbone(algorithm, tasks) if worth_it else None
    if backbone is not None:
        with prediction_mode(algorithm, seed, device):
            features = on_features(tasks, backbone, device)
        with skipped(algorithm):
            return evaluate_episodes(
                algorithm, features, episodes, seed, inner_steps, device, progress, stream
            )
    generator = stream_generator(stream, seed)
    parts = []
    bar = progress_bar(
        desc="evaluating", total=episodes, unit="episode", disable=not progress, leave=False
    )
    with prediction_mode(algorithm, seed, device), bar:
        # episodes of varying size (Meta-Dataset's) come one at a time
        per_draw = 1 if getattr(tasks, "varies", False) else EPISODES_PER_DRAW
        for start in range(0, episodes, per_draw):
            batch = tasks.sample(per_draw, generator)[: episodes - start].to(device)
            predictions = algorithm.predict(batch, inner_steps=inner_steps)
            parts.append(episode_scores(predictions, batch.query_y).cpu())
            bar.update(len(batch))
    scores = torch.cat(parts).double()
    ci95 = 1.96 * scores.std().item() / math.sqrt(len(scores)) if len(scores) > 1 else float("nan")
    metric = "mse" if batch.query_y.is_floating_point() else "accuracy"
    steps = reported_steps(algorithm, inner_steps)
    return EvalResult(metric, scores.mean().item(), ci95, len(scores), steps), scores


def examples_per_episode(tasks) -> int:
    """How many examples an episode of `tasks` holds (Meta-Dataset's: at most)."""
    if hasattr(tasks, "ways") and hasattr(tasks, "shots") and hasattr(tasks, "queries"):
        return tasks.ways * (tasks.shots + tasks.queries)
    return 50 * 20  # Meta-Dataset's largest: 50 ways, imbalanced shots, up to 10 queries


@contextlib.contextmanager
def prediction_mode(
    algorithm: Algorithm, seed: int, device: torch.device | str = "cpu"
) -> Iterator[None]:
    """How a trained method predicts in evaluation, in figures and for `fewshot adapt`: eval
    mode, no gradients kept, torch's random numbers (fine-tuning mini-batches, the order in
    which a support set is read) seeded from `seed`, and the caller's generator states and
    the method's mode put back after."""
    device = torch.device(device)
    forked = [device.index or 0] if device.type == "cuda" else []
    was_training = algorithm.training
    algorithm.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)
            yield
    finally:
        algorithm.train(was_training)


def reported_steps(algorithm: Algorithm, inner_steps: int | None) -> int | None:
    """The adaptation steps a result states: `inner_steps` or the method's own, and none for
    a method without steps (it ignored them)."""
    if not algorithm.adapts_by_steps:
        return None
    learner = cast(GradientLearner, algorithm)  # a method that adapts by steps
    return learner.eval_inner_steps if inner_steps is None else inner_steps


@dataclass(frozen=True)
class PairedDifference:
    """Mean per-episode difference a - b of two models scored on the same episodes, its 95%
    confidence half-width (1.96 * std / sqrt(episodes), as for one model), and the two-sided
    p-value of the paired t-test of a zero mean difference."""

    mean: float
    ci95: float
    t: float
    p_value: float
    episodes: int


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> PairedDifference:
    """Compare per-episode scores of two models on the same episodes, in the same order."""
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one shape, got {a.shape} and {b.shape}")
    differences = (a - b).double()
    n = len(differences)
    sd = differences.std().item()
    if sd == 0:  # identical (or constantly shifted) scores: the t statistic is undefined
        mean = differences.mean().item()
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    else:
        import scipy.stats  # only here: it adds a noticeable start-up time

        test = scipy.stats.ttest_rel(a.double().numpy(), b.double().numpy())
        t, p = float(test.statistic), float(test.pvalue)
    return PairedDifference(differences.mean().item(), 1.96 * sd / math.sqrt(n), t, p, n)


def test_report(
    algorithm: Algorithm,
    config: TrainConfig,
    sampler,
    episodes: int,
    seed: int,
    inner_steps: int | None,
    device: torch.device | str,
) -> dict:
    """A run's meta-test report, as `fewshot eval` and the end of `fewshot train` print and
    save it: accuracy at the evaluation steps (regression: the MSE at 0, 1 and the evaluation
    steps), the episodes' settings, and "lines", the results as printed."""
    # A method that adapts by steps is a `GradientLearner`.
    learner = cast(GradientLearner, algorithm)
    eval_steps = learner.eval_inner_steps if algorithm.adapts_by_steps else None
    regression = get_dataset(config.dataset).regression
    cache = config.cache_features is not False
    if regression and inner_steps is None and eval_steps is not None:
        steps_to_report = sorted({0, 1, eval_steps})
        results = [
            evaluate(algorithm, sampler, episodes, seed, steps, device, True, "eval", cache)
            for steps in steps_to_report
        ]
        report = results[-1].to_dict()
        report["mse_by_inner_steps"] = {str(r.inner_steps): r.mean for r in results}
        report["ci95_by_inner_steps"] = {str(r.inner_steps): r.ci95 for r in results}
        report["lines"] = [str(r) for r in results]
    else:
        result = evaluate(
            algorithm, sampler, episodes, seed, inner_steps, device, True, "eval", cache
        )
        report = result.to_dict()
        report["lines"] = [str(result)]
    episode_settings: dict[str, object] = {
        "dataset": config.dataset,
        "split": config.split if applies("split", config.dataset) else None,
        "ways": None if regression else config.ways,
        "shots": config.shots,
        "queries": config.queries,
        "seed": seed,
        "algorithm": config.algorithm,
        "batch_norm": algorithm.batch_norm,
    }
    if config.sampler == "meta-dataset":  # each episode has its own ways, shots and queries
        episode_settings.update(sampler="meta-dataset", ways=None, shots=None, queries=None)
    fine_tuning = getattr(algorithm, "support_fine_tuning", None)
    if fine_tuning is not None:  # P>M>F's F, which the figures include
        episode_settings["support_fine_tuning"] = asdict(fine_tuning)
    return {**report, **episode_settings}
