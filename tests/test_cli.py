"""The command line end to end on sinusoid, and its one-line errors."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fewshot.cli import LEAN_MALLOC, TUNED_MALLOC, main, malloc_settings
from fewshot.training import TrainConfig
from fewshot.training.checkpoint import write_config

QUICK = ["--iterations", "20", "--val-every", "10", "--val-episodes", "25", "--test-episodes", "25"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


RESULT_LINE = re.compile(
    r"(?P<metric>mse|accuracy) (?P<mean>[\d.]+)%? ± (?P<ci95>[\d.]+)%? "
    r"\(95% CI, (?P<episodes>\d+) episodes\)(?: after (?P<steps>\d+) inner steps?)?"
)


def printed_results(output: str, prefix: str) -> list[dict]:
    """The figures of the output's lines starting with `prefix` ("meta-test", "best
    validation:"), as printed: mean and ci95 (accuracy in %), episodes, inner steps."""
    results = []
    for line in output.splitlines():
        if line.startswith(prefix):
            match = RESULT_LINE.search(line)
            assert match, line
            values = match.groupdict()
            results.append(
                {
                    "metric": values["metric"],
                    "mean": float(values["mean"]),
                    "ci95": float(values["ci95"]),
                    "episodes": int(values["episodes"]),
                    "steps": None if values["steps"] is None else int(values["steps"]),
                }
            )
    return results


def as_printed(value: float, metric: str) -> float:
    """A figure rounded as the command line prints it."""
    return round(100 * value, 2) if metric == "accuracy" else round(value, 4)


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sin"
    result = run("train", *QUICK, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_train_writes_a_run_folder_and_reports_mse(sinusoid_run):
    out, output = sinusoid_run
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "model.safetensors"}
    config = json.loads((out / "config.json").read_text())
    assert config["inner_lr"] == 0.01 and config["meta_batch"] == 25 and config["shots"] == 10
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in lines if r.get("split") == "val"]
    assert [r["iteration"] for r in validations] == [10, 20]
    # the best validation printed is the lowest one recorded
    best = min(validations, key=lambda r: r["mse"])
    assert printed_results(output, "best validation:") == [
        {"metric": "mse", "mean": as_printed(best["mse"], "mse"),
         "ci95": as_printed(best["ci95"], "mse"), "episodes": 25, "steps": 10}
    ]  # fmt: skip
    # the meta-test figures printed are those `fewshot eval` gets again from the run folder
    tested = printed_results(output, "meta-test")
    assert [t["steps"] for t in tested] == [0, 1, 10]
    report = json.loads(run("eval", out, "--episodes", "25", "--json").output)
    for t in tested:
        assert t["episodes"] == 25 and math.isfinite(t["mean"]) and t["ci95"] > 0
        assert t["mean"] == as_printed(report["mse_by_inner_steps"][str(t["steps"])], "mse")
        assert t["ci95"] == as_printed(report["ci95_by_inner_steps"][str(t["steps"])], "mse")


@pytest.mark.slow
def test_eval_json_reports_the_protocol(sinusoid_run):
    out, _ = sinusoid_run
    result = run("eval", out, "--episodes", "50", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["episodes"] == 50 and report["metric"] == "mse"
    assert set(report["mse_by_inner_steps"]) == {"0", "1", "10"}
    again = json.loads(run("eval", out, "--episodes", "50", "--json").output)
    assert again == report  # fixed evaluation seed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--inner-lr", "-1"], "--inner-lr must be positive"),
        (["--meta-batch", "0"], "--meta-batch must be positive"),
        (["--chunk-size", "0"], "--chunk-size must be positive"),
        (
            ["--algorithm", "protonet"],
            "protonet does not handle --dataset sinusoid; use --dataset omniglot, folder, csv, "
            "mini-imagenet, tiered-imagenet, cifar-fs, fc100 or cub.",
        ),
        (["--algorithm", "protonet", "--first-order"], "first_order is not a setting of protonet"),
        (["--dataset", "omniglot", "--data-root", "/nonexistent"], "Pass --download"),
        (
            ["--dataset", "omniglot", "--data-root", __file__],
            f"--data-root is the folder that holds omniglot's files, and {__file__} is a file; "
            f"point it at the folder, {Path(__file__).parent}.",
        ),
    ],
)
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    result = run("train", *QUICK, "--out", out, *args)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_unknown_algorithm_is_refused():
    result = run("train", "--algorithm", "reptil")
    assert result.exit_code == 2 and "'reptil' is not one of" in result.output


def test_run_folder_without_checkpoint_is_one_line(tmp_path):
    result = run("eval", tmp_path)
    assert result.exit_code == 2 and "is not a run folder" in result.output


@pytest.mark.slow
def test_existing_run_folder_is_not_overwritten(sinusoid_run):
    out, _ = sinusoid_run
    before = (out / "metrics.jsonl").read_text()
    result = run("train", *QUICK, "--out", out)
    assert result.exit_code == 2 and "already holds a run" in result.output
    assert (out / "metrics.jsonl").read_text() == before


def test_debug_shows_the_traceback(tmp_path):
    result = run("--debug", "train", "--inner-lr", "-1", "--out", tmp_path / "r")
    assert result.exception is not None and type(result.exception).__name__ == "ConfigError"


@pytest.mark.omniglot
@pytest.mark.parametrize(
    "args, message",
    [
        (["--ways", "1000", "--split", "lake"], "ways=1000 is larger than the 864 classes"),
        (["--shots", "10", "--queries", "15"], "--shots + --train-queries = 25 is more than"),
    ],
)
def test_impossible_omniglot_episodes_are_one_line(tmp_path, omniglot_root, args, message):
    result = run(
        "train",
        "--dataset",
        "omniglot",
        "--data-root",
        omniglot_root,
        "--out",
        tmp_path / "r",
        *args,
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "r").exists()


def test_config_file_with_unknown_keys_is_refused(tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"inner_lr": 0.02, "inner_rate": 3}')
    result = run("train", "--config", config, "--out", tmp_path / "r")
    expected = "inner_rate is not a setting of maml (did you mean inner_lr?); its settings are"
    assert result.exit_code == 2 and expected in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_config_file_settings_apply_and_options_override_them(tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"inner_lr": 0.02, "meta_batch": 3, "iterations": 5, "val_every": 5}')
    result = run(
        "train",
        "--config",
        config,
        "--meta-batch",
        "4",
        "--val-episodes",
        "5",
        "--test-episodes",
        "0",
        "--out",
        tmp_path / "r",
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["inner_lr"], saved["meta_batch"], saved["iterations"]) == (0.02, 4, 5)


@pytest.mark.slow
def test_run_folder_of_another_version_is_refused(sinusoid_run, tmp_path):
    out, _ = sinusoid_run
    copy = tmp_path / "old"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((out / name).read_bytes())
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "format": 99}))
    result = run("eval", copy)
    assert result.exit_code == 2 and "incompatible fewshot version" in result.output


@pytest.mark.slow
def test_weights_of_another_model_are_refused(sinusoid_run, tmp_path):
    import torch
    from safetensors.torch import save_file

    out, _ = sinusoid_run
    copy = tmp_path / "other"
    copy.mkdir()
    (copy / "config.json").write_bytes((out / "config.json").read_bytes())
    save_file({"encoder.weight": torch.zeros(3, 3)}, copy / "model.safetensors")
    result = run("eval", copy)
    assert result.exit_code == 2 and "does not fit this model" in result.output
    assert result.output.count("\n") == 1


@pytest.mark.slow
def test_resume_refuses_new_settings(sinusoid_run):
    out, _ = sinusoid_run
    result = run("train", "--resume", out, "--inner-lr", "0.1")
    assert result.exit_code == 2 and "drop --inner-lr" in result.output


def test_image_size_applies_to_folder_datasets_only(tmp_path):
    result = run(
        "train",
        "--dataset",
        "omniglot",
        "--algorithm",
        "maml",
        "--image-size",
        "84",
        "--out",
        tmp_path / "r",
    )
    assert result.exit_code == 2
    assert "--image-size applies to --dataset folder only, not omniglot" in result.output
    assert not (tmp_path / "r").exists()
    result = run("train", "--split", "lake", "--out", tmp_path / "r")
    assert "--split applies to --dataset omniglot only, not sinusoid" in result.output


@pytest.mark.slow
def test_a_sinusoid_runs_config_holds_no_image_settings(sinusoid_run):
    recorded = json.loads((sinusoid_run[0] / "config.json").read_text())
    for name in ("split", "image_size", "channels", "label_column", "features"):
        assert name not in recorded, name


@pytest.mark.slow
def test_time_limit_stops_with_a_validated_checkpoint_and_resume_continues(tmp_path):
    """A time limit belongs to one invocation: a stop by it says how to resume and runs no
    meta-test; --resume takes a new limit; the meta-test runs once, when the run finishes."""
    out = tmp_path / "timed"
    quick = ("--val-episodes", "5", "--test-episodes", "5")
    result = run("train", "--iterations", "1500", "--time-limit", "0.005", *quick, "--out", out)
    assert result.exit_code == 0, result.output
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stopped_at = first[-1]["iteration"]
    assert first[-1]["split"] == "val" and 0 < stopped_at < 1500
    assert (
        f"time limit of 0.005 minutes reached after iteration {stopped_at}; resume with: "
        f"fewshot train --resume {out}\n" in result.output
    )
    assert "meta-test" not in result.output  # not before the run has finished
    result = run("train", "--resume", out, "--time-limit", "0.005")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"resuming {out} at iteration {stopped_at} of 1500\n")
    later = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert later[-1]["iteration"] > stopped_at  # the limit counts per invocation
    result = run("train", "--resume", out)  # no limit: the recorded one was the first's
    assert result.exit_code == 0, result.output
    assert result.output.count("meta-test mse") == 3  # at 0, 1 and 10 inner steps, once
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["iteration"] == 1500


@pytest.mark.slow
@pytest.mark.parametrize("method", ["meta-sgd", "anil", "reptile"])
def test_every_gradient_method_trains_and_evaluates_from_the_command_line(tmp_path, method):
    out = tmp_path / method
    result = run("train", "--algorithm", method, *QUICK, "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == method and config["batch_norm"] == "transductive"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in records if "split" not in r]
    assert training and all("loss" in r for r in training)
    if method != "reptile":  # the query loss after adaptation, and the support loss before
        assert all("inner_loss" in r for r in training)
    evaluated = run("eval", out, "--episodes", "10")
    assert evaluated.exit_code == 0 and f"{method}, batch norm: transductive" in evaluated.output
    transductive = json.loads(run("eval", out, "--episodes", "10", "--json").output)
    printed = printed_results(evaluated.output, "meta-test")[-1]
    assert printed["mean"] == as_printed(transductive["mse"], "mse") and printed["steps"] > 0
    inductive = json.loads(
        run("eval", out, "--episodes", "10", "--batch-norm", "inductive", "--json").output
    )
    assert inductive["batch_norm"] == "inductive"
    # the sinusoid network has no batch norm: the policy cannot change a single figure
    assert inductive["mse_by_inner_steps"] == transductive["mse_by_inner_steps"]


def test_methods_lists_every_registered_method_with_its_paper_and_settings():
    from fewshot.algorithms import METHODS

    listing = json.loads(run("methods", "--json").output)
    assert set(listing) == set(METHODS) >= {"maml", "protonet", "reptile", "meta-sgd", "anil"}
    assert listing["reptile"]["class"] == "Reptile" and "Nichol" in listing["reptile"]["paper"]
    assert listing["protonet"]["batch_norm"] == "inductive"
    assert "inner_optimizer" in listing["reptile"]["settings"]
    assert listing["maml"]["defaults"]["omniglot"]["inner_lr"] == 0.4
    text = run("methods").output
    assert all(f"{name}  (fewshot." in text for name in METHODS)


def test_settings_of_another_method_are_refused_by_name(tmp_path):
    result = run(
        "train", *QUICK, "--algorithm", "maml", "--inner-optimizer", "sgd", "--out", tmp_path / "r"
    )
    assert result.exit_code == 2 and "inner_optimizer is not a setting of maml" in result.output


def test_generated_flags_and_choices_parse(tmp_path):
    out = tmp_path / "r"
    result = run(
        "train",
        *QUICK,
        "--no-vectorize",
        "--first-order",
        "--batch-norm",
        "inductive",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["vectorize"] is False and config["first_order"] is True
    assert config["batch_norm"] == "inductive"
    bad = run("train", *QUICK, "--batch-norm", "sometimes", "--out", tmp_path / "s")
    assert bad.exit_code == 2 and "'sometimes' is not one of" in bad.output


@pytest.mark.slow
def test_compare_scores_every_run_on_the_same_episodes_with_paired_differences(
    sinusoid_run, tmp_path
):
    from fewshot.training import load_run
    from fewshot.training.evaluation import evaluate_episodes, paired_difference

    other = tmp_path / "finetune"
    trained = run("train", "--algorithm", "finetune", *QUICK, "--out", other)
    assert trained.exit_code == 0, trained.output
    first = sinusoid_run[0]
    result = run("compare", first, other, "--episodes", "40", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    scores = []
    for run_dir, reported in zip((first, other), report["runs"]):
        _, algorithm, sources = load_run(run_dir)
        scores.append(evaluate_episodes(algorithm, sources.test, 40, seed=0)[1])
        assert reported["mse"] == pytest.approx(scores[-1].mean().item(), rel=1e-12)
    (pair,) = report["pairs"]
    expected = paired_difference(*scores)
    assert pair["mean"] == pytest.approx(expected.mean) and pair["p_value"] == expected.p_value
    assert report["shots"] == 10 and report["dataset"] == "sinusoid"
    text = run("compare", first, other, "--episodes", "40").output
    assert "paired t-test p =" in text and "finetune" in text


@pytest.mark.slow
def test_compare_refuses_runs_of_different_episodes(sinusoid_run, tmp_path):
    other = tmp_path / "k5"
    assert run("train", *QUICK, "--shots", "5", "--out", other).exit_code == 0
    result = run("compare", sinusoid_run[0], other)
    assert result.exit_code == 2
    assert (
        "not evaluated on the same episodes" in result.output and "shots (10 vs 5)" in result.output
    )


@pytest.mark.slow
@pytest.mark.omniglot
@pytest.mark.parametrize(
    "method", ["baseline", "baseline++", "finetune", "matchingnet", "relationnet"]
)
def test_the_metric_and_fine_tuning_methods_train_and_evaluate_on_omniglot(
    tmp_path, omniglot_root, method
):
    out = tmp_path / method
    quick = ["--iterations", "4", "--val-every", "2", "--val-episodes", "4", "--test-episodes", "0"]
    fine_tuning = method in ("baseline", "baseline++", "finetune")
    args = ["--algorithm", method, "--dataset", "omniglot", "--data-root", omniglot_root, *quick]
    result = run("train", *args, *(["--finetune-epochs", "2"] if fine_tuning else []), "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["batch_norm"] == "inductive"
    if fine_tuning:  # pretraining over every class
        assert config["classes"] == 4400 and config["meta_batch"] == 16
    report = json.loads(
        run("eval", out, "--data-root", omniglot_root, "--episodes", "5", "--json").output
    )
    assert report["algorithm"] == method and 0 <= report["accuracy"] <= 1
    # a mean over 5 episodes of 5-way, 15-query accuracies counts whole correct answers
    correct = report["accuracy"] * 5 * 5 * 15
    assert correct == pytest.approx(round(correct), abs=1e-3)
    three_way = run(
        "eval", out, "--data-root", omniglot_root, "--episodes", "3", "--ways", "3", "--json"
    )
    if fine_tuning:  # the episode head has one output per way
        assert three_way.exit_code == 2 and "trained 5-way" in three_way.output
    else:
        assert json.loads(three_way.output)["ways"] == 3


@pytest.mark.slow
def test_eval_takes_other_episode_shapes_where_the_model_allows(sinusoid_run):
    report = json.loads(
        run("eval", sinusoid_run[0], "--shots", "5", "--episodes", "10", "--json").output
    )
    assert report["shots"] == 5 and report["queries"] == 10


def assert_one_line_error(result, *fragments):
    """A refusal as the command line promises it: one line, `error: `, exit status 2."""
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def copy_run(run_dir, to):
    import shutil

    shutil.copytree(run_dir, to)
    return to


def damage(path, key):
    """Set one value of tensor `key` of a safetensors file to NaN, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata=metadata)


@pytest.mark.slow
def test_damaged_best_weights_are_refused_by_file_and_tensor(sinusoid_run, tmp_path):
    from safetensors.torch import load_file

    copy = copy_run(sinusoid_run[0], tmp_path / "damaged")
    key = sorted(load_file(copy / "model.safetensors"))[-1]
    damage(copy / "model.safetensors", key)
    result = run("eval", copy, "--episodes", "10")
    assert_one_line_error(result, f"model.safetensors is damaged: {key} holds NaN", "--out")
    assert "±" not in result.output


@pytest.mark.slow
def test_damaged_resumable_checkpoint_is_refused_and_left_as_it_was(sinusoid_run, tmp_path):
    from safetensors.torch import load_file

    copy = copy_run(sinusoid_run[0], tmp_path / "damaged")
    key = next(k for k in sorted(load_file(copy / "state.safetensors")) if "algorithm" in k)
    damage(copy / "state.safetensors", key)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    result = run("train", "--resume", copy, "--test-episodes", "0")
    assert_one_line_error(result, f"state.safetensors is damaged: {key} holds NaN", "resumed")
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


@pytest.mark.slow
@pytest.mark.parametrize("episodes", ["1", "0"])
@pytest.mark.parametrize("command", ["eval", "compare"])
def test_fewer_than_two_episodes_are_refused_in_one_line(sinusoid_run, command, episodes):
    runs = [sinusoid_run[0]] * (2 if command == "compare" else 1)
    result = run(command, *runs, "--episodes", episodes)
    assert_one_line_error(result, "--episodes must be at least 2", f"got {episodes}.")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "compare"])
def test_one_way_evaluation_is_refused_in_one_line(sinusoid_run, command):
    runs = [sinusoid_run[0]] * (2 if command == "compare" else 1)
    result = run(command, *runs, "--ways", "1", "--episodes", "10")
    assert_one_line_error(result, "--ways must be at least 2")


@pytest.fixture(scope="module")
def folder_protonet_run(tmp_path_factory):
    """A ProtoNet run folder trained briefly on a small image folder dataset."""
    from tests.datasets.test_image_folder import make_dataset, train_protonet_on_folder

    root = tmp_path_factory.mktemp("protonet")
    make_dataset(root / "data")
    quick = ["--iterations", 4, "--val-every", 2, "--val-episodes", 5, "--test-episodes", 0]
    result = train_protonet_on_folder(root, 1, *quick, "--image-size", 16)
    assert result.exit_code == 0, result.output
    return root / "run", root / "data"


@pytest.mark.slow
def test_a_method_without_steps_reports_none_and_refuses_inner_steps(folder_protonet_run):
    run_dir, data = folder_protonet_run
    evaluated = run("eval", run_dir, "--data-root", data, "--episodes", "10")
    assert evaluated.exit_code == 0, evaluated.output
    assert "meta-test accuracy" in evaluated.output and "inner steps" not in evaluated.output
    for command in (["eval", run_dir], ["compare", run_dir, run_dir]):
        result = run(*command, "--data-root", data, "--episodes", "10", "--inner-steps", "5")
        assert_one_line_error(result, "--inner-steps does not apply", "protonet", "drop")


def test_training_episode_errors_name_the_training_options(tmp_path):
    from tests.datasets.test_image_folder import make_dataset

    make_dataset(tmp_path / "data", classes=8)
    out = tmp_path / "run"
    args = ["train", "--algorithm", "protonet", "--dataset", "folder", "--image-size", 16]
    args += ["--data-root", tmp_path / "data", "--out", out]
    too_wide = run(*args)  # ProtoNet's training episodes are 60-way by default
    assert_one_line_error(too_wide, "train part: --train-ways=60", "set --train-ways to 8")
    assert "--ways 8" not in too_wide.output
    too_long = run(*args, "--train-ways", 8)  # and have 5 queries a class
    assert_one_line_error(too_long, "train part:", "lower --shots or --train-queries.")
    held_out = run(*args, "--train-ways", 8, "--train-queries", 2)  # 15 queries to evaluate
    assert_one_line_error(held_out, "val part:", "lower --shots or --queries.")
    assert not out.exists()


def test_a_held_out_part_of_one_class_is_refused(tmp_path):
    import shutil

    from tests.datasets.test_image_folder import make_dataset, train_protonet_on_folder

    make_dataset(tmp_path / "data")
    for extra in sorted((tmp_path / "data" / "test").iterdir())[1:]:
        shutil.rmtree(extra)
    result = train_protonet_on_folder(tmp_path, 1, "--image-size", 16)
    assert_one_line_error(result, "test part: this split has 1 class", "add classes")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_eval_of_a_run_stopped_before_validating_advises_resuming_it(tmp_path):
    from fewshot.training import TrainConfig, train

    class Interrupt(Exception):
        pass

    def interrupt(record):
        raise Interrupt

    out = tmp_path / "stopped"
    config = TrainConfig(iterations=20, val_every=10, val_episodes=5)
    with pytest.raises(Interrupt):  # at iteration 10's log line, before its validation
        train(config, out, progress=False, listeners=[interrupt])
    assert not (out / "model.safetensors").exists()
    refused = run("eval", out, "--episodes", "10")
    assert_one_line_error(refused, f"fewshot train --resume {out}")
    assert "--out" not in refused.output
    resumed = run("train", "--resume", out, "--test-episodes", "0")  # the advice works
    assert resumed.exit_code == 0, resumed.output
    assert run("eval", out, "--episodes", "10").exit_code == 0


def test_missing_omniglot_speaks_of_command_line_options_only(tmp_path):
    result = run(
        "train", "--dataset", "omniglot", "--data-root", tmp_path / "no", "--out", tmp_path / "r"
    )
    assert_one_line_error(result, "Pass --download to fetch it", "--data-root")
    assert "download=True" not in result.output and "data_root" not in result.output
    assert not (tmp_path / "r").exists()


def test_train_help_is_in_sections_with_the_papers_defaults_and_examples():
    output = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    titles = [line for line in output.splitlines() if line.endswith(" options:")]
    assert titles == [
        "Data options:", "Episodes options:", "Method options:", "Backbone options:",
        "Optimisation options:",
        "Run and checkpoints options:", "Hardware options:", "Other options:",
    ]  # fmt: skip
    method = output[output.index("Method options:") : output.index("Backbone options:")]
    assert "  --inner-lr FLOAT" in method and "  --first-order" in method
    assert "  --outer-lr FLOAT" not in method
    method = " ".join(method.split())  # help lines wrap
    assert "Papers: sinusoid 0.01 (maml, anil, maml++, meta-lstm, meta-sgd)" in method
    assert "omniglot 0.4 (maml, anil, meta-sgd)" in method
    assert output.count("fewshot train ") >= 3  # the examples


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's settings: Linux only")
def test_the_allocator_settings_follow_what_the_command_is_for():
    """`fewshot` restarts under glibc settings that keep freed memory, or, for
    --checkpoint-inner (whose point is less memory), ones that return it; under none where the
    user set their own or opted out."""
    train = ["train", "--algorithm", "maml", "--dataset", "omniglot"]
    assert malloc_settings(train, {}) == TUNED_MALLOC
    assert malloc_settings([*train, "--checkpoint-inner"], {}) == LEAN_MALLOC
    assert malloc_settings(train, {"MALLOC_ARENA_MAX": "2"}) is None
    assert malloc_settings([*train, "--checkpoint-inner"], {"MALLOC_ARENA_MAX": "2"}) is None
    assert malloc_settings(train, {"FEWSHOT_NO_MALLOC_TUNING": "1"}) is None
    # the user's own huge-page choice stands; glibc's settings still apply
    mine = {"THP_MEM_ALLOC_ENABLE": "0"}
    lean_but_mine = {k: v for k, v in LEAN_MALLOC.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert malloc_settings([*train, "--checkpoint-inner"], mine) == lean_but_mine
    assert malloc_settings(train, mine) == TUNED_MALLOC
    # the restarted process, under the settings, starts as it is: no second restart
    assert malloc_settings([*train, "--checkpoint-inner"], LEAN_MALLOC) is None
    assert malloc_settings(train, TUNED_MALLOC) is None


ADVISED = """
import torch
x = torch.ones(16 << 20)  # 64 MiB
address, inside = x.data_ptr(), False
for line in open("/proc/self/smaps"):
    first = line.split()[0]
    if not first.endswith(":"):  # a mapping's header: start-end perms ...
        start, end = (int(bound, 16) for bound in first.split("-"))
        inside = start <= address < end
    elif inside and first == "VmFlags:":
        print("hg" in line.split()[1:])  # advised MADV_HUGEPAGE
"""


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage").exists()
    or not Path("/proc/self/smaps").exists(),
    reason="no transparent huge pages, or no /proc/self/smaps, here",
)
def test_under_the_lean_settings_torch_asks_for_huge_pages_for_large_tensors():
    """LEAN_MALLOC's THP_MEM_ALLOC_ENABLE is the variable torch's CPU allocator reads: the
    mapping of a 64 MiB tensor made under it is advised for huge pages (MADV_HUGEPAGE, whatever
    the kernel then finds), and not without it."""
    # (the user's settings too, and glibc's own huge-page tunable)
    base = {k: v for k, v in os.environ.items() if k not in LEAN_MALLOC and k != "GLIBC_TUNABLES"}

    def advised(env: dict[str, str]) -> bool:
        done = subprocess.run(
            [sys.executable, "-c", ADVISED], env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.split() == ["True"]

    assert advised({**base, **LEAN_MALLOC})
    assert not advised(base)


def test_a_restart_runs_the_command_again_under_the_settings_added():
    """`restart_under` replaces the process by the command under its environment plus the
    settings: the allocators' variables, read only at start-up, then take effect."""
    restarting = (
        "import sys; from fewshot.cli import restart_under; "
        "restart_under({'FEWSHOT_TEST_SETTING': 'on'}, "
        "[sys.executable, '-c', 'import os; print(os.environ[\"FEWSHOT_TEST_SETTING\"])'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", restarting], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["on"]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's settings: Linux only")
def test_checkpointing_from_a_config_file_or_a_resumed_run_also_gets_the_lean_allocator(
    tmp_path,
):
    train = ["train", "--algorithm", "maml", "--dataset", "omniglot"]
    asking = tmp_path / "asking.json"
    asking.write_text(json.dumps({"algorithm": "maml", "checkpoint_inner": True}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"algorithm": "maml"}))
    assert malloc_settings([*train, "--config", str(asking)], {}) == LEAN_MALLOC
    assert malloc_settings([*train, f"--config={asking}"], {}) == LEAN_MALLOC
    no = [*train, "--config", str(asking), "--no-checkpoint-inner"]
    assert malloc_settings(no, {}) == TUNED_MALLOC
    assert malloc_settings([*train, "--config", str(plain)], {}) == TUNED_MALLOC
    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(algorithm="maml", dataset="omniglot", settings={"checkpoint_inner": True})
    write_config(run, config.resolved())
    assert malloc_settings(["train", "--resume", str(run)], {}) == LEAN_MALLOC
    missing = ["train", "--resume", str(tmp_path / "missing")]
    assert malloc_settings(missing, {}) == TUNED_MALLOC


@pytest.mark.omniglot
def test_eval_fine_tunes_a_metric_method_on_each_support_set_when_asked(omniglot_root):
    zoo = Path(__file__).resolve().parents[1] / "zoo" / "protonet-omniglot-5w1s"
    args = ["eval", zoo, "--data-root", omniglot_root, "--episodes", "2", "--json"]
    plain = json.loads(run(*args).output)
    tuned = json.loads(run(*args, "--finetune-steps", "3", "--finetune-lr", "0.01").output)
    assert "support_fine_tuning" not in plain
    assert tuned["support_fine_tuning"] == {"steps": 3, "lr": 0.01, "augment": "crop"}
    again = json.loads(run(*args, "--finetune-steps", "3", "--finetune-lr", "0.01").output)
    assert again["accuracy"] == tuned["accuracy"]  # the evaluation seed fixes its draws
    alone = run(*args, "--finetune-steps", "3")
    assert alone.exit_code == 2 and "--finetune-steps and --finetune-lr go together" in alone.output
