"""Run folders that remember: data root, test episodes and command options recorded; fresh
folders; resume that extends a finished run exactly; --init from another run's weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import fewshot
from fewshot import files
from fewshot.cli import main
from fewshot.datasets.sinusoid import SinusoidTasks
from fewshot.training import TrainConfig, train
from fewshot.training.evaluation import evaluate
from fewshot.training.state import STATE_FILE, load_state, restore_global_rngs
from tests.conftest import write_random_image_folder

SHORT = ["--val-every", "20", "--val-episodes", "5", "--checkpoint-every", "10"]


def invoke(*args) -> object:
    return CliRunner().invoke(main, [*map(str, args)])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def training_lines(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


@pytest.mark.slow
def test_a_finished_run_extended_by_resume_equals_a_run_given_the_total_from_the_start(tmp_path):
    extended, straight = tmp_path / "extended", tmp_path / "straight"
    ok("train", "--iterations", "40", *SHORT, "--test-episodes", "0", "--out", extended)
    result = ok("train", "--resume", extended, "--iterations", "60")
    assert "validation" in result.output
    ok("train", "--iterations", "60", *SHORT, "--test-episodes", "0", "--out", straight)

    a, b = load_file(extended / STATE_FILE), load_file(straight / STATE_FILE)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name].numpy(), b[name].numpy()), name
    assert training_lines(extended) == training_lines(straight)
    assert json.loads((extended / "config.json").read_text())["iterations"] == 60


@pytest.mark.slow
def test_resuming_a_finished_run_with_nothing_to_add_says_so_in_one_line(tmp_path):
    run = tmp_path / "run"
    ok("train", "--iterations", "20", *SHORT, "--test-episodes", "30", "--out", run)
    before = (run / "metrics.jsonl").read_text()
    result = invoke("train", "--resume", run)
    assert result.exit_code == 0
    assert result.output.strip() == (
        f"note: {run} has finished its 20 iterations; to train it further, resume it with "
        "--iterations N (more than 20)."
    )
    assert (run / "metrics.jsonl").read_text() == before
    assert "fewer than the 20" in one_error_line(
        invoke("train", "--resume", run, "--iterations", 10)
    )


@pytest.mark.slow
def test_an_annealed_schedule_is_not_extended(tmp_path):
    run = tmp_path / "reptile"
    ok("train", "--algorithm", "reptile", "--iterations", "20", *SHORT, "--test-episodes", "0",
       "--out", run)  # fmt: skip
    line = one_error_line(invoke("train", "--resume", run, "--iterations", "40"))
    assert "reptile's learning-rate schedule spans the run's iterations" in line
    assert f"fewshot train --init {run} --iterations 40" in line


@pytest.mark.slow
def test_a_resumed_run_tests_the_episodes_it_was_given(tmp_path):
    run = tmp_path / "run"
    ok("train", "--iterations", "20", *SHORT, "--test-episodes", "30", "--out", run)
    result = ok("train", "--resume", run, "--iterations", "30")
    assert "(95% CI, 30 episodes) after 10 inner steps" in result.output
    assert "600 episodes" not in result.output


@pytest.mark.slow
def test_a_run_remembers_its_data_and_says_where_it_was_once_moved(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    write_random_image_folder(data)
    ok("train", "--algorithm", "protonet", "--dataset", "folder", "--data-root", data,
       "--image-size", "16", "--ways", "3", "--train-ways", "3", "--shots", "1", "--queries",
       "2", "--train-queries", "2", "--iterations", "10", "--val-every", "10",
       "--val-episodes", "5", "--test-episodes", "0", "--out", run)  # fmt: skip
    assert json.loads((run / "config.json").read_text())["data_root"] == str(data.resolve())
    ok("eval", run, "--episodes", "10")  # no --data-root: the recorded one

    moved = tmp_path / "moved"
    shutil.move(data, moved)
    line = one_error_line(invoke("eval", run, "--episodes", "10"))
    assert f"trained on data in {data.resolve()}, which is no longer there" in line
    assert "point --data-root at where it is now" in line
    ok("eval", run, "--episodes", "10", "--data-root", moved)


@pytest.mark.slow
def test_a_config_file_holds_every_option_of_the_command_line(tmp_path, monkeypatch):
    out = tmp_path / "from-file"
    config = {
        "iterations": 20,
        "val_every": 10,
        "val_episodes": 5,
        "test_episodes": 7,
        "threads": 1,
        "device": "cpu",
        "out": str(out),
        "tensorboard": False,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = ok("train", "--config", path)
    assert "(95% CI, 7 episodes)" in result.output
    recorded = json.loads((out / "config.json").read_text())
    assert (recorded["iterations"], recorded["test_episodes"]) == (20, 7)
    path.write_text(json.dumps({**config, "threads": 0}))
    assert "the config file's threads" in one_error_line(invoke("train", "--config", path))


@pytest.mark.slow
def test_out_refuses_a_folder_of_other_files_and_a_new_run_gets_a_fresh_folder(
    tmp_path, monkeypatch
):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    line = one_error_line(invoke("train", "--iterations", "10", "--out", busy))
    assert "is not an empty folder and holds no run" in line
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]

    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        ok("train", "--iterations", "10", "--val-every", "10", "--val-episodes", "5",
           "--test-episodes", "0")  # fmt: skip
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    assert all(r.name.startswith("maml-sinusoid-") and (r / "config.json").is_file() for r in runs)


@pytest.mark.slow
def test_init_starts_a_new_run_from_another_runs_best_weights(tmp_path):
    first = tmp_path / "first"
    ok("train", "--iterations", "20", *SHORT, "--test-episodes", "0", "--out", first)

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    second = tmp_path / "second"
    config = TrainConfig(iterations=20, checkpoint_every=100, init=str(first))
    with pytest.raises(Stop):  # stopped at the first record: the checkpoint is of iteration 0
        train(config, second, progress=False, listeners=[stop])
    start = load_file(second / STATE_FILE)
    best = load_file(first / "model.safetensors")
    for name, value in best.items():
        assert np.array_equal(start[f"algorithm.{name}"].numpy(), value.numpy()), name

    line = one_error_line(
        invoke(
            "train",
            "--algorithm",
            "protonet",
            "--dataset",
            "sinusoid",
            "--init",
            first,
            "--out",
            tmp_path / "third",
        )  # fmt: skip
    )
    assert "does not handle" in line or f"--init {first}" in line


@pytest.mark.slow
def test_validation_and_test_episodes_come_from_separate_streams(tmp_path):
    """The validation recorded in training is the "val" stream's; `fewshot eval --seed 1`
    (the validation seed) draws other tasks, from the "eval" stream."""
    run = tmp_path / "run"
    ok("train", "--iterations", "10", "--val-every", "10", "--val-episodes", "5",
       "--test-episodes", "0", "--out", run)  # fmt: skip
    recorded = [r for r in training_lines(run) if r.get("split") == "val"][0]["mse"]
    method, tasks = fewshot.load(run), SinusoidTasks(10, 10)
    assert evaluate(method, tasks, 5, seed=1, stream="val").mean == pytest.approx(recorded)
    assert evaluate(method, tasks, 5, seed=1).mean != pytest.approx(recorded)


@pytest.mark.slow
def test_every_validation_writes_a_checkpoint(tmp_path):
    """Best weights and the resumable checkpoint never disagree: a run killed after a
    validation resumes from it, whatever --checkpoint-every says."""

    class Killed(Exception):
        pass

    def kill_at_30(record):
        if record["iteration"] == 30:
            raise Killed

    config = TrainConfig(iterations=40, val_every=20, val_episodes=5, checkpoint_every=1000)
    with pytest.raises(Killed):
        train(config, tmp_path / "run", progress=False, listeners=[kill_at_30])
    assert load_state(tmp_path / "run" / STATE_FILE).iteration == 20


def test_an_atomic_write_flushes_the_folder_after_the_rename(tmp_path, monkeypatch):

    flushed = []
    real = os.fsync

    def recording_fsync(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    files.atomic_write_text(tmp_path / "a.json", "{}")
    assert flushed[-1] == str(tmp_path)
    assert (tmp_path / "a.json").read_text() == "{}"


@pytest.mark.slow
def test_the_checkpoint_keeps_the_cuda_generators_and_restores_them(tmp_path, monkeypatch):
    """Faked CUDA devices: their generator states go into the checkpoint and come back."""
    devices = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    run = tmp_path / "run"
    train(TrainConfig(iterations=10, val_every=10, val_episodes=5), run, progress=False)
    saved = load_state(run / STATE_FILE)
    assert [t.tolist() for t in saved.cuda_rng] == [[1, 2, 3], [4, 5]]
    restore_global_rngs(saved)
    assert [t.tolist() for t in restored] == [[1, 2, 3], [4, 5]]


class BarSpy:
    """A progress bar that records, with each line written above it, the count it shows."""

    def __init__(self, bar) -> None:
        self.bar, self.lines = bar, []

    def __getattr__(self, name):
        return getattr(self.bar, name)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def write(self, text: str) -> None:
        self.lines.append((self.bar.n, text))


def test_a_validation_line_names_the_iteration_the_progress_bar_shows(tmp_path, monkeypatch):
    """One numbering: "iteration 10: validation ..." while the bar reads 10/20, not 9/20."""
    import io

    from fewshot.progress import progress_bar
    from fewshot.training import loop

    spies = []

    def spied(**options):
        spies.append(BarSpy(progress_bar(**options, file=io.StringIO())))
        return spies[-1]

    monkeypatch.setattr(loop, "progress_bar", spied)
    config = TrainConfig(dataset="sinusoid", iterations=20, val_every=10, val_episodes=2)
    train(config, tmp_path / "run", progress=True)
    validations = [(n, text) for n, text in spies[0].lines if ": validation " in text]
    assert [n for n, _ in validations] == [10, 20]
    assert [text.split(":")[0] for _, text in validations] == ["iteration 10", "iteration 20"]
