import math

import numpy as np
import pytest
import torch

from fewshot.algorithms.base import Algorithm
from fewshot.datasets.sinusoid import SinusoidTasks
from fewshot.errors import ConfigError
from fewshot.tasks import TaskSampler, stream_generator
from fewshot.training import TrainConfig, train
from fewshot.training.evaluation import evaluate, evaluate_episodes, paired_difference


class Peek(Algorithm):
    """Predicts a query's label from its input (inputs encode the class), wrong on purpose for
    class 0 of each task, so the expected accuracy per episode is known exactly."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def predict(self, tasks, inner_steps=None):
        self.seen.append(tasks.query_x.clone())
        ways = int(tasks.support_y.max()) + 1
        wrong = torch.where(tasks.query_y == 0, 1, tasks.query_y)
        return torch.nn.functional.one_hot(wrong, ways).float()


def sampler():
    labels = torch.arange(20).repeat_interleave(6)
    return TaskSampler(torch.arange(360.0).view(120, 3), labels, ways=4, shots=1, queries=2)


def test_accuracy_mean_and_ci_follow_the_protocol():
    result = evaluate(Peek(), sampler(), episodes=60, seed=0)
    assert result.metric == "accuracy" and result.episodes == 60
    assert math.isclose(result.mean, 0.75)  # one of four classes always wrong
    assert result.ci95 == 0.0


def test_ci_is_196_std_over_sqrt_episodes():
    class Zero(Algorithm):
        def predict(self, tasks, inner_steps=None):
            return torch.zeros_like(tasks.query_y)

    result = evaluate(Zero(), SinusoidTasks(5, 5), episodes=90, seed=2)
    scores = []
    tasks = SinusoidTasks(5, 5)
    g = stream_generator("eval", 2)
    for _ in range(4):
        batch = tasks.sample(25, g)
        scores += batch.query_y.pow(2).mean((1, 2)).tolist()
    scores = np.array(scores[:90])
    assert math.isclose(result.mean, scores.mean(), rel_tol=1e-6)
    assert math.isclose(result.ci95, 1.96 * scores.std(ddof=1) / math.sqrt(90), rel_tol=1e-6)


def test_same_seed_gives_the_same_episodes_for_every_model():
    a, b = Peek(), Peek()
    evaluate(a, sampler(), episodes=30, seed=5)
    evaluate(b, sampler(), episodes=30, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.seen, b.seen))


def test_evaluation_never_draws_the_training_tasks_of_the_same_seed():
    """Sinusoid tasks are continuous: with a shared stream, the meta-test would be training data."""
    tasks = SinusoidTasks(5, 5)
    trained_on = tasks.sample(25, stream_generator("train", 0))
    evaluated_on = tasks.sample(25, stream_generator("eval", 0))
    assert not torch.isin(evaluated_on.support_x, trained_on.support_x).any()


def test_paired_difference_by_hand():
    from scipy import stats

    from fewshot.training.evaluation import paired_difference

    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, generator=g, dtype=torch.float64)
    b = a - 0.05 + 0.1 * torch.rand(50, generator=g, dtype=torch.float64)
    result = paired_difference(a, b)
    d = (a - b).numpy()
    t = d.mean() / (d.std(ddof=1) / math.sqrt(50))
    assert math.isclose(result.mean, d.mean(), rel_tol=1e-12)
    assert math.isclose(result.ci95, 1.96 * d.std(ddof=1) / math.sqrt(50), rel_tol=1e-12)
    assert math.isclose(result.t, t, rel_tol=1e-9)
    assert math.isclose(result.p_value, 2 * stats.t.sf(abs(t), df=49), rel_tol=1e-9)
    same = paired_difference(a, a.clone())
    assert (same.mean, same.ci95, same.p_value) == (0.0, 0.0, 1.0)


def test_a_finite_validation_replaces_a_nan_best():
    from fewshot.training.evaluation import EvalResult
    from fewshot.training.loop import is_better

    nan = EvalResult("mse", float("nan"), float("nan"), 10, 1)
    finite = EvalResult("mse", 2.0, 0.1, 10, 1)
    assert is_better(finite, nan)
    assert not is_better(nan, finite)
    assert is_better(EvalResult("accuracy", 0.5, 0.1, 10, 1), EvalResult("accuracy", 0.4, 0, 10, 1))


@pytest.mark.parametrize("episodes", [0, -3])
def test_no_episodes_is_a_clear_error(episodes):
    with pytest.raises(ConfigError, match=f"`episodes` must be positive, got {episodes}"):
        evaluate(Peek(), sampler(), episodes=episodes)


def test_one_episode_says_it_has_no_interval_instead_of_nan():
    result = evaluate(Peek(), sampler(), episodes=1)
    assert result.episodes == 1 and math.isclose(result.mean, 0.75)
    text = str(result)
    assert "nan" not in text and "±" not in text
    assert text == "accuracy 75.00% (1 episode: too few for a confidence interval)"
    assert "± 0.00% (95% CI, 2 episodes)" in str(evaluate(Peek(), sampler(), episodes=2))


class Stepped(Peek):
    """Peek declared to adapt by steps, 3 by default."""

    adapts_by_steps = True
    eval_inner_steps = 3


def test_only_methods_that_adapt_by_steps_report_steps():
    assert evaluate(Peek(), sampler(), episodes=5, inner_steps=5).inner_steps is None
    assert "inner steps" not in str(evaluate(Peek(), sampler(), episodes=5, inner_steps=5))
    assert evaluate(Stepped(), sampler(), episodes=5).inner_steps == 3
    stepped = evaluate(Stepped(), sampler(), episodes=5, inner_steps=5)
    assert stepped.inner_steps == 5 and str(stepped).endswith("after 5 inner steps")
    one = evaluate(Stepped(), sampler(), episodes=5, inner_steps=1)
    assert str(one).endswith("after 1 inner step")


@pytest.mark.slow
def test_short_maml_training_makes_adaptation_lower_the_sinusoid_error(tmp_path):
    """After 1,000 iterations, 10 inner steps on K = 10 points lower the query MSE of the same
    100 tasks: the paired difference (before - after) lies above zero with its 95% interval."""
    config = TrainConfig(iterations=1000, val_every=1000, val_episodes=20)
    algorithm, sources, _ = train(config, tmp_path / "run", progress=False)
    _, before = evaluate_episodes(algorithm, sources.test, 100, seed=0, inner_steps=0)
    _, after = evaluate_episodes(algorithm, sources.test, 100, seed=0, inner_steps=10)
    gain = paired_difference(before, after)
    assert gain.mean - gain.ci95 > 0, gain
