"""`fewshot tune`: short sinusoid studies through the command line, pruning, shared storage,
and its one-line errors."""

import json
import shlex
import subprocess
import sys

import optuna
import pytest
from click.testing import CliRunner

from fewshot.algorithms import get_method
from fewshot.cli import main
from fewshot.training import tuning
from fewshot.training.tuning import SearchDimension

BOTH = ("inductive", "transductive")
QUICK = ["--iterations", "20", "--val-every", "10", "--val-episodes", "10"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def load(study_dir, name=None):
    storage = tuning.default_storage(study_dir)
    return optuna.load_study(study_name=name or study_dir.name, storage=storage)


def validation_values(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "val"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    study_dir = tmp_path_factory.mktemp("studies") / "sin"
    result = run("tune", *QUICK, "--study-dir", study_dir, "--trials", 3)
    assert result.exit_code == 0, result.output
    return study_dir, result.output


@pytest.mark.slow
def test_the_study_names_its_device_first(study):
    _, output = study
    assert output.splitlines()[0].startswith("device: cpu (")


@pytest.mark.slow
def test_three_trials_are_tabled_and_the_best_is_the_storage_minimum(study):
    study_dir, output = study
    table = output[output.index("trial  state") :].splitlines()
    rows = [line.split() for line in table[1:4]]
    assert [row[:2] for row in rows] == [[str(n), "complete"] for n in range(3)]
    assert table[0].split()[2:6] == ["mse", "outer_lr", "inner_lr", "inner_steps"]
    trials = load(study_dir).trials
    assert len(trials) == 3 and len({t.params["outer_lr"] for t in trials}) == 3
    best = json.loads((study_dir / "best.json").read_text())
    assert best["value"] == min(t.value for t in trials)
    assert best["trial"] == min(trials, key=lambda t: t.value).number
    assert f"best: trial {best['trial']}, validation mse {best['value']:.4f}" in output
    for n in range(3):
        assert (study_dir / f"trial-{n:04d}" / "model.safetensors").is_file()
        assert f"trial {n} complete: mse" in output  # a line as each trial finishes


@pytest.mark.slow
def test_searched_inner_steps_set_the_evaluation_steps_of_each_trial(study):
    study_dir, _ = study
    for trial in load(study_dir).trials:
        config = json.loads((study_dir / f"trial-{trial.number:04d}" / "config.json").read_text())
        assert config["inner_steps"] == trial.params["inner_steps"]
        assert config["eval_inner_steps"] == max(10, trial.params["inner_steps"])  # MAML: 10
        assert config["iterations"] == 20 and config["outer_lr"] == trial.params["outer_lr"]


@pytest.mark.slow
def test_the_best_command_reproduces_the_best_trial_exactly(study):
    study_dir, _ = study
    best = json.loads((study_dir / "best.json").read_text())
    command = shlex.split((study_dir / "best-command.txt").read_text())
    assert command[:2] == ["fewshot", "train"]
    assert command[-2:] == ["--out", str(study_dir / "best")]
    result = run(*command[1:], "--test-episodes", 0)
    assert result.exit_code == 0, result.output
    again = validation_values(study_dir / "best")
    trial = validation_values(study_dir / f"trial-{best['trial']:04d}")
    assert again == trial
    assert min(r["mse"] for r in again) == best["value"]


@pytest.mark.slow
def test_a_rerun_continues_the_study_and_other_processes_can_share_its_storage(tmp_path):
    study_dir = tmp_path / "study"
    for _ in range(2):
        result = run("tune", *QUICK, "--study-dir", study_dir, "--trials", 1)
        assert result.exit_code == 0, result.output
    trials = load(study_dir).trials
    assert [t.number for t in trials] == [0, 1]
    assert trials[0].params != trials[1].params  # the sampler does not redraw the first values
    assert "\n1      complete" in result.output  # the second run's table holds both
    # another machine: its own folder, the same storage and study name
    storage = tuning.default_storage(study_dir)
    shared = ["--storage", storage, "--study-name", "study", "--trials", 1, "--sampler-seed", 7]
    result = run("tune", *QUICK, "--study-dir", tmp_path / "elsewhere", *shared)
    assert result.exit_code == 0, result.output
    assert len(load(study_dir).trials) == 3
    assert (tmp_path / "elsewhere" / "trial-0002" / "config.json").is_file()


@pytest.mark.slow
def test_a_continued_study_must_fix_the_same_settings(tmp_path):
    study_dir = tmp_path / "study"
    assert run("tune", *QUICK, "--study-dir", study_dir, "--trials", 1).exit_code == 0
    result = run("tune", *QUICK, "--iterations", 30, "--study-dir", study_dir, "--trials", 1)
    assert result.exit_code == 2
    assert "was run with other settings (iterations 20 (now 30))" in result.output
    assert len(load(study_dir).trials) == 1


def quick_plan(**options):
    base = {"iterations": 20, "val_every": 10, "val_episodes": 10, **options}
    space = [SearchDimension("outer_lr", 1e-4, 1e-2, log=True)]
    return base, space


@pytest.mark.slow
def test_a_trial_the_pruner_stops_ends_early_and_the_study_goes_on(tmp_path):
    base, space = quick_plan()
    always = optuna.pruners.ThresholdPruner(upper=0.0)  # every MSE is above it
    study = tuning.tune(base, space, tmp_path / "s", trials=2, pruner=always)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    for trial in study.trials:
        assert list(trial.intermediate_values) == [10]
        assert trial.user_attrs["note"].startswith("pruned at iteration 10 (mse ")
        metrics = (tmp_path / "s" / f"trial-{trial.number:04d}" / "metrics.jsonl").read_text()
        assert max(json.loads(line)["iteration"] for line in metrics.splitlines()) == 10
    assert not (tmp_path / "s" / "best.json").exists()
    assert "pruned" in tuning.trials_table(study)


@pytest.mark.slow
def test_the_last_validation_is_never_pruned(tmp_path):
    base, space = quick_plan(iterations=10)
    always = optuna.pruners.ThresholdPruner(upper=0.0)
    study = tuning.tune(base, space, tmp_path / "s", trials=1, pruner=always)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE


def test_the_median_pruner_spares_the_first_validation(tmp_path):
    base, space = quick_plan()
    resolved = tuning.TrainConfig.from_dict(base).resolved()
    pruner = tuning.median_pruner(resolved, prune_after=5)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (5, 11)
    assert isinstance(tuning.median_pruner(resolved, None), optuna.pruners.NopPruner)


def test_validations_report_the_best_so_far_and_a_nan_best_ends_the_trial():
    study = optuna.create_study()
    trial = study.ask()
    listen = tuning.pruning_listener(trial, last_iteration=100)
    listen({"iteration": 10, "loss": 1.0})  # training lines are not reported
    listen({"iteration": 20, "split": "val", "metric": "mse", "mse": 2.0, "best": True})
    listen({"iteration": 40, "split": "val", "metric": "mse", "mse": 3.0})
    listen({"iteration": 60, "split": "val", "metric": "mse", "mse": float("nan")})
    assert study.trials[0].intermediate_values == {20: 2.0, 40: 2.0, 60: 2.0}
    trial = study.ask()
    listen = tuning.pruning_listener(trial, last_iteration=100)
    nan = {"iteration": 20, "split": "val", "metric": "mse", "mse": float("nan"), "best": True}
    with pytest.raises(optuna.TrialPruned, match="validation mse is nan at iteration 20"):
        listen(nan)
    assert study.trials[1].user_attrs["diverged"] is True


@pytest.mark.slow
def test_a_diverging_trial_is_marked_and_the_study_goes_on(tmp_path):
    study_dir = tmp_path / "study"
    search = ["--search", "inner_lr=1e6:1e7:log", "--inner-steps", 1, "--outer-lr", 0.001]
    result = run("tune", *QUICK, *search, "--study-dir", study_dir, "--trials", 2)
    assert result.exit_code == 0, result.output
    assert result.output.count("training diverged at iteration 1") == 4  # lines and table
    assert "no trial has completed yet" in result.output
    assert [t.user_attrs["diverged"] for t in load(study_dir).trials] == [True, True]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--search", "momentum=0.1:0.9"], "momentum is no training option; maml can search"),
        (["--search", "outer_lr=0.1:0.01:log"], "LOW must be below HIGH, got 0.1 and 0.01."),
        (["--search", "outer_lr=0:0.1:log"], "a log scale needs LOW > 0, got 0."),
        (["--search", "inner_steps=1.5:4"], "inner_steps takes integers, got 1.5 and 4."),
        (["--search", "outer_lr=1e-4:1e-2:cubic"], "unknown range flag 'cubic'"),
        (["--search", "first_order=true,maybe"], "'maybe' is not true or false."),
        (["--search", "inner_lr=0.05"], "give a range LOW:HIGH[:log][:int] or choices"),
        (["--search", "shots=1:10"], "shots defines the validation episodes that score"),
        (
            ["--algorithm", "reptile", "--search", "first_order=true,false"],
            "reptile has no setting first_order; reptile can search",
        ),
        (["--inner-lr", "0.01", "--search", "inner-lr=1e-3:1e-1:log"], "--inner-lr is given"),
        (["--search", "meta_batch=0:8"], "with meta_batch = 0, --meta-batch must be positive"),
        (
            ["--outer-lr", 1e-3, "--inner-lr", 0.01, "--inner-steps", 1],
            "nothing to search: every learning rate and step count is given",
        ),
    ],
)
def test_bad_search_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    study_dir = tmp_path / "study"
    result = run("tune", *QUICK, "--study-dir", study_dir, *args)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not study_dir.exists()


@pytest.mark.parametrize(
    "text, dimension",
    [
        ("outer_lr=1e-4:1e-2:log", SearchDimension("outer_lr", 1e-4, 1e-2, log=True)),
        ("--meta-batch=4:32:int:log", SearchDimension("meta_batch", 4, 32, log=True, integer=True)),
        ("meta-batch=4:32", SearchDimension("meta_batch", 4, 32, integer=True)),
        ("inner_lr=1:4:int", SearchDimension("inner_lr", 1, 4, integer=True)),
        ("first_order=true,false", SearchDimension("first_order", choices=(True, False))),
        ("batch_norm=inductive,transductive", SearchDimension("batch_norm", choices=BOTH)),
    ],
)
def test_search_texts(text, dimension):
    assert tuning.parse_search(text, get_method("maml")) == dimension


def test_the_default_space_follows_the_method():
    def names(**base):
        return [d.describe() for d in tuning.search_space(base)]

    assert names() == [
        "outer_lr: numbers from 0.0001 to 0.01, log-uniform",
        "inner_lr: numbers from 0.001 to 0.1, log-uniform",
        "inner_steps: integers from 1 to 5",
    ]
    assert names(algorithm="maml++")[-1] == "inner_steps: integers from 1 to 10"
    assert names(algorithm="protonet", dataset="omniglot") == [
        "outer_lr: numbers from 0.0001 to 0.01, log-uniform"
    ]
    assert names(algorithm="finetune", outer_lr=0.001) == [
        "finetune_lr: numbers from 0.001 to 0.1, log-uniform"
    ]


def test_without_optuna_the_command_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)  # makes `import optuna` fail
    result = run("tune", *QUICK, "--study-dir", tmp_path / "s")
    assert result.exit_code == 2
    assert result.output == "error: fewshot tune needs Optuna: pip install 'fewshot[tune]'\n"


@pytest.mark.slow
def test_importing_fewshot_does_not_import_optuna():
    modules = "fewshot, fewshot.cli, fewshot.training.tuning"
    code = f"import sys, {modules}; print('optuna' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_missing_data_and_stale_trial_folders_are_refused_before_any_trial(tmp_path):
    study = tmp_path / "study"
    result = CliRunner().invoke(
        main,
        ["tune", "--dataset", "folder", "--data-root", str(tmp_path / "nowhere"),
         "--study-dir", str(study), "--trials", "1"],
    )  # fmt: skip
    assert result.exit_code == 2 and "does not exist" in result.output, result.output
    assert not study.exists()

    (study / "trial-0000").mkdir(parents=True)
    result = CliRunner().invoke(
        main, ["tune", "--iterations", "10", "--study-dir", str(study), "--trials", "1"]
    )
    assert result.exit_code == 2, result.output
    assert "holds trial folders its study's storage does not know (trial-0000" in result.output
