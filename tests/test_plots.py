"""`fewshot plot`: the numbers behind each figure against independent computations, the PNGs
the command writes, and its one-line refusals."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.func import functional_call

from fewshot.cli import main
from fewshot.plots import (
    adaptation_curve,
    first_test_episode,
    moving_average,
    predict_test_episode,
    random_initialisation,
    read_training_curves,
    sinusoid_fit,
    sinusoid_test_task,
    step_grid,
)
from fewshot.tasks import stream_generator
from fewshot.training.checkpoint import read_config
from fewshot.training.evaluation import evaluate, evaluate_episodes
from fewshot.training.factory import build_sources
from fewshot.training.loading import load_run
from fewshot.training.loop import Run
from tests.datasets.test_image_folder import make_dataset

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--iterations", 20, "--val-every", 10, "--val-episodes", 10, "--test-episodes", 0]
FEW = ["--episodes", 4, "--steps", 3]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def train(out: Path, *args) -> Path:
    result = run("train", *QUICK, "--out", out, *args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def maml_sinusoid(tmp_path_factory):
    return train(tmp_path_factory.mktemp("runs") / "maml")


@pytest.fixture(scope="module")
def finetune_sinusoid(tmp_path_factory):
    return train(tmp_path_factory.mktemp("runs") / "finetune", "--algorithm", "finetune")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_dataset(root)
    return root


def train_on_folder(out: Path, root: Path, algorithm: str) -> Path:
    return train(
        out,
        *("--algorithm", algorithm, "--dataset", "folder", "--data-root", root),
        *("--image-size", 16, "--ways", 3, "--train-ways", 3, "--shots", 1),
        *("--queries", 2, "--train-queries", 2, "--meta-batch", 2),
    )


@pytest.fixture(scope="module")
def maml_folder(tmp_path_factory, image_folder):
    return train_on_folder(tmp_path_factory.mktemp("runs") / "maml", image_folder, "maml")


@pytest.fixture(scope="module")
def protonet_folder(tmp_path_factory, image_folder):
    return train_on_folder(tmp_path_factory.mktemp("runs") / "proto", image_folder, "protonet")


def assert_png(path: Path, min_width: int = 400, min_height: int = 250) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        width, height = image.size
    assert min_width <= width <= 3000 and min_height <= height <= 2000, (width, height)


# -- the numbers -----------------------------------------------------------------------------


def test_training_curves_are_the_logged_values(tmp_path):
    lines = [
        {"iteration": 10, "loss": 2.0, "accuracy": 0.3, "seconds": 1.0},
        {"iteration": 20, "loss": 1.5, "seconds": 2.0},
        {"iteration": 20, "split": "val", "metric": "accuracy", "accuracy": 0.5, "ci95": 0.1,
         "episodes": 7, "inner_steps": 3, "best": True},
        {"iteration": 30, "loss": 1.0, "accuracy": 0.6, "seconds": 3.0},
        {"iteration": 40, "split": "val", "metric": "accuracy", "accuracy": 0.7, "ci95": 0.05,
         "episodes": 7, "inner_steps": 3, "best": True},
        {"iteration": 60, "split": "val", "metric": "accuracy", "accuracy": 0.6, "ci95": 0.05,
         "episodes": 7, "inner_steps": 3},
    ]  # fmt: skip
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"iteration": 70, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    curves = read_training_curves(tmp_path)
    assert curves.iterations == [10, 20, 30]
    assert curves.metrics["loss"] == [2.0, 1.5, 1.0]
    accuracy = curves.metrics["accuracy"]
    assert accuracy[0] == 0.3 and np.isnan(accuracy[1]) and accuracy[2] == 0.6
    assert "inner_loss" not in curves.metrics
    validation = curves.validation
    assert validation.iterations == [20, 40, 60] and validation.mean == [0.5, 0.7, 0.6]
    assert validation.ci95 == [0.1, 0.05, 0.05] and validation.metric == "accuracy"
    assert validation.best_iteration == 40 and validation.inner_steps == 3


@pytest.mark.slow
def test_training_curves_of_a_trained_run(maml_sinusoid):
    records = [
        json.loads(line) for line in (maml_sinusoid / "metrics.jsonl").read_text().splitlines()
    ]
    curves = read_training_curves(maml_sinusoid)
    training = [r for r in records if "split" not in r]
    assert curves.metrics["loss"] == [r["loss"] for r in training]
    assert curves.metrics["inner_loss"] == [r["inner_loss"] for r in training]
    assert curves.validation.mean == [r["mse"] for r in records if r.get("split") == "val"]


def test_moving_average_is_the_mean_of_each_window():
    values = np.random.default_rng(0).normal(size=30)
    expected = [values[max(0, i - 4) : i + 1].mean() for i in range(30)]
    np.testing.assert_allclose(moving_average(values, 5), expected)
    np.testing.assert_allclose(moving_average(values, 1), values)


def test_step_grid():
    assert step_grid(10) == list(range(11))
    grid = step_grid(125)
    assert grid[:3] == [0, 1, 2] and grid[-1] == 125 and len(grid) <= 22
    assert grid == sorted(set(grid))


@pytest.mark.slow
def test_adaptation_curve_is_the_evaluation_after_each_number_of_steps(maml_sinusoid):
    _, algorithm, sources = load_run(maml_sinusoid)
    curve = adaptation_curve(algorithm, sources.test, [0, 1, 4], episodes=30, seed=5)
    assert curve.metric == "mse" and curve.steps == [0, 1, 4]
    for steps, mean, ci95 in zip(curve.steps, curve.mean, curve.ci95):
        expected = evaluate(algorithm, sources.test, 30, 5, inner_steps=steps)
        assert (mean, ci95) == (expected.mean, expected.ci95)
    # Before any step the prediction is the initialisation's, the network alone, on the
    # episodes that the evaluation seed draws (in draws of 25).
    generator = stream_generator("eval", 5)
    draws = [sources.test.sample(25, generator) for _ in range(2)]
    query_x = torch.cat([d.query_x for d in draws])[:30]
    query_y = torch.cat([d.query_y for d in draws])[:30]
    with torch.no_grad():
        before = torch.mean((algorithm.model(query_x) - query_y) ** 2).item()
    assert curve.mean[0] == pytest.approx(before, rel=1e-5)
    assert curve.mean[2] != curve.mean[0]  # the steps change the predictions


@pytest.mark.slow
def test_random_initialisation_is_the_runs_starting_point(maml_sinusoid):
    config = read_config(maml_sinusoid)
    state = torch.random.get_rng_state()
    untrained = random_initialisation(config).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    started = Run(config, maml_sinusoid / "unused", build_sources(config), "cpu").algorithm
    for name, value in started.state_dict().items():
        assert torch.equal(untrained[name], value), name
    _, trained, _ = load_run(maml_sinusoid)
    assert not torch.equal(untrained["model.0.weight"], trained.state_dict()["model.0.weight"])


@pytest.mark.slow
def test_sinusoid_fit_shows_the_drawn_task_and_the_adapted_predictions(maml_sinusoid):
    config, algorithm, sources = load_run(maml_sinusoid)
    test_task = sinusoid_test_task(sources.test, seed=3)
    first = first_test_episode(sources.test, seed=3)
    for drawn, evaluated in zip(test_task.task.tensors(), first.tensors()):
        assert torch.equal(drawn, evaluated)
    fit = sinusoid_fit(algorithm, test_task, [0, 1, 10], seed=3, points=50)
    amplitude, phase = test_task.amplitude, test_task.phase
    np.testing.assert_allclose(fit.x, np.linspace(-5, 5, 50), atol=1e-6)
    np.testing.assert_allclose(fit.truth, amplitude * np.sin(fit.x - phase), atol=1e-5)
    # The true function passes through the task's sampled points.
    x = torch.cat([first.support_x, first.query_x], 1).flatten().numpy()
    y = torch.cat([first.support_y, first.query_y], 1).flatten().numpy()
    np.testing.assert_allclose(amplitude * np.sin(x - phase), y, atol=1e-5)
    np.testing.assert_array_equal(fit.support_x, first.support_x.flatten().numpy())
    # Before adaptation, the network alone; after one step, one SGD step on the support MSE.
    grid = torch.from_numpy(fit.x).view(-1, 1)
    model = algorithm.model
    theta = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
    support = functional_call(model, theta, (first.support_x[0],))
    loss = torch.mean((support - first.support_y[0]) ** 2)
    gradients = torch.autograd.grad(loss, list(theta.values()))
    stepped = {
        name: p - config.settings.inner_lr * g for (name, p), g in zip(theta.items(), gradients)
    }
    with torch.no_grad():
        before = functional_call(model, theta, (grid,)).flatten().numpy()
        after = functional_call(model, stepped, (grid,)).flatten().numpy()
    np.testing.assert_allclose(fit.predictions[0], before, atol=1e-5)
    np.testing.assert_allclose(fit.predictions[1], after, atol=1e-5)
    assert not np.allclose(fit.predictions[1], fit.predictions[10])
    assert fit.mse(10) == pytest.approx(np.mean((fit.predictions[10] - fit.truth) ** 2))


@pytest.mark.slow
def test_episode_predictions_are_the_methods_argmax(maml_folder, image_folder):
    _, algorithm, sources = load_run(maml_folder, image_folder)
    shown = predict_test_episode(algorithm, sources.test, seed=2)
    episode = sources.test.sample(25, stream_generator("eval", 2))[:1]
    for drawn, expected in zip(shown.episode.tensors(), episode[0].tensors()):
        assert torch.equal(drawn, expected)
    with torch.no_grad():
        logits = algorithm.predict(episode)
    assert torch.equal(shown.predicted, logits[0].argmax(-1))
    assert torch.equal(shown.correct, logits[0].argmax(-1) == episode.query_y[0])
    _, scores = evaluate_episodes(algorithm, sources.test, 1, seed=2)
    assert shown.accuracy == pytest.approx(scores[0].item())


# -- the command -----------------------------------------------------------------------------


@pytest.mark.slow
def test_plot_writes_the_sinusoid_figures(maml_sinusoid, finetune_sinusoid, tmp_path):
    out = tmp_path / "figures"
    result = run("plot", maml_sinusoid, "--baseline", finetune_sinusoid, "--out", out, *FEW)
    assert result.exit_code == 0, result.output
    names = ["curves.png", "adaptation.png", "sinusoid.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert f"wrote {out / name}" in result.output
        assert_png(out / name)
    with Image.open(out / "sinusoid.png") as two_panels:
        assert two_panels.size[0] > 1000


@pytest.mark.slow
def test_plot_without_baseline_draws_one_panel_and_says_how_to_add_one(maml_sinusoid):
    result = run("plot", maml_sinusoid, *FEW)
    assert result.exit_code == 0, result.output
    assert "--baseline RUN" in result.output
    out = maml_sinusoid / "plots"
    for name in ("curves.png", "adaptation.png", "sinusoid.png"):
        assert_png(out / name)
    with Image.open(out / "sinusoid.png") as one_panel:
        assert one_panel.size[0] < 1000


@pytest.mark.slow
def test_plot_writes_the_classification_figures(maml_folder, image_folder, tmp_path):
    result = run("plot", maml_folder, "--data-root", image_folder, "--out", tmp_path, *FEW)
    assert result.exit_code == 0, result.output
    for name in ("curves.png", "adaptation.png", "episode.png"):
        assert_png(tmp_path / name, min_height=150)
    assert not (tmp_path / "sinusoid.png").exists()


@pytest.mark.slow
def test_plot_of_a_metric_method_skips_the_adaptation_curve(protonet_folder, image_folder):
    result = run("plot", protonet_folder, "--data-root", image_folder, *FEW)
    assert result.exit_code == 0, result.output
    assert "adaptation.png: not drawn, protonet takes no gradient steps" in result.output
    out = protonet_folder / "plots"
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "episode.png"]
    assert_png(out / "episode.png", min_height=150)


@pytest.mark.slow
@pytest.mark.omniglot
def test_plot_of_an_omniglot_run(omniglot_root, tmp_path):
    zoo_run = REPO / "zoo" / "protonet-omniglot-5w1s"
    result = run("plot", zoo_run, "--data-root", omniglot_root, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert_png(tmp_path / "episode.png")
    assert_png(tmp_path / "curves.png")


# -- refusals --------------------------------------------------------------------------------


def assert_one_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_not_a_run_folder_is_one_line(tmp_path):
    assert_one_line(run("plot", tmp_path, *FEW), "is not a run folder")
    assert not (tmp_path / "plots").exists()


@pytest.mark.slow
def test_baseline_on_another_dataset_is_one_line(maml_sinusoid, protonet_folder, tmp_path):
    result = run("plot", maml_sinusoid, "--baseline", protonet_folder, "--out", tmp_path / "o")
    assert_one_line(result, "differ in dataset (sinusoid vs folder)")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_baseline_with_another_k_is_one_line(maml_sinusoid, finetune_sinusoid, tmp_path):
    other = tmp_path / "k5"
    shutil.copytree(finetune_sinusoid, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "shots": 5}))
    result = run("plot", maml_sinusoid, "--baseline", other, "--out", tmp_path / "o")
    assert_one_line(result, "differ in shots (10 vs 5)")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_missing_matplotlib_is_one_line(maml_sinusoid, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    result = run("plot", maml_sinusoid, "--out", tmp_path / "o")
    assert_one_line(result, "fewshot plot needs matplotlib: pip install 'fewshot[plot]'")
    assert not (tmp_path / "o").exists()
