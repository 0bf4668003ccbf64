"""scripts/zoo_results.py: docs/results.md's tables are made from the zoo's measured results,
and results measured on other weights are refused."""

import importlib.util
import json
import shutil

import pytest
from click.testing import CliRunner

from fewshot.cli import main as fewshot_main
from fewshot.training.evaluation import evaluate
from fewshot.training.loading import load_run
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("zoo_results", REPO / "scripts" / "zoo_results.py")
zoo_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(zoo_results)


def test_the_results_document_matches_the_zoo():
    """Every zoo folder's results.json was measured on its committed weights, and the tables
    in docs/results.md are exactly what those results generate."""
    folders = zoo_results.zoo_folders(zoo_results.ZOO)
    assert len(folders) >= 10
    document = zoo_results.RESULTS_DOC.read_text(encoding="utf-8")
    assert zoo_results.render(document, folders) == document


@pytest.mark.slow
def test_a_new_run_is_evaluated_into_the_table_and_stale_results_are_refused(tmp_path):
    import click

    zoo = tmp_path / "zoo"
    quick = [
        "--iterations",
        "20",
        "--val-every",
        "10",
        "--val-episodes",
        "5",
        "--test-episodes",
        "0",
    ]
    for name, algorithm in (("a-sinusoid", "maml"), ("b-sinusoid", "finetune")):
        out = zoo / name
        result = CliRunner().invoke(
            fewshot_main, ["train", "--algorithm", algorithm, *quick, "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        card = {"method": f"method {name}", "budget": "20 iterations", "command": "fewshot train"}
        (out / "card.json").write_text(json.dumps(card))
        (out / "results.json").write_text(json.dumps(zoo_results.evaluate_folder(out, None)))
    folders = zoo_results.zoo_folders(zoo)
    results = json.loads((zoo / "a-sinusoid" / "results.json").read_text())
    report = results["reports"][0]["report"]
    table = zoo_results.sinusoid_table(zoo_results.load_zoo(folders))
    assert f"{report['mse_by_inner_steps']['1']:.3f}" in table and "method b-sinusoid" in table
    shutil.copy(zoo / "b-sinusoid" / "model.safetensors", zoo / "a-sinusoid" / "model.safetensors")
    with pytest.raises(click.ClickException, match="measured on other weights"):
        zoo_results.load_zoo(folders)


@pytest.mark.slow
@pytest.mark.omniglot
@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "zoo").iterdir() if p.is_dir()))
def test_a_short_evaluation_of_each_zoo_model_lands_near_its_recorded_figure(name, omniglot_root):
    """The first 25 of the recorded 600 episodes (same seed, same draws), evaluated now, agree
    with the recorded figure within the two intervals: a change to a method, the sampler or
    the evaluator that moves a zoo model's accuracy shows here."""
    run = REPO / "zoo" / name
    reports = json.loads((run / "results.json").read_text())["reports"]
    recorded = next(r["report"] for r in reports if not r["shape"] and r["policy"] is None)
    config, algorithm, sources = load_run(run, omniglot_root)
    short = evaluate(algorithm, sources.test, episodes=25, seed=recorded["seed"])
    assert short.metric == recorded["metric"]
    assert abs(short.mean - recorded[short.metric]) <= short.ci95 + recorded["ci95"]
