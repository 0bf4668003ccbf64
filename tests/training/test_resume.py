"""Interrupted runs resume exactly; checkpoints survive kills; divergence stops cleanly."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewshot.errors import DivergenceError
from fewshot.training import TrainConfig, train
from fewshot.training.state import STATE_FILE, TrainingState, load_state

# Every test here trains, most in a subprocess that is stopped and resumed.
pytestmark = pytest.mark.slow

ARGS = [
    "--iterations",
    "400",
    "--val-every",
    "100",
    "--val-episodes",
    "20",
    "--checkpoint-every",
    "25",
    "--test-episodes",
    "0",
    "--meta-batch",
    "5",
]


def fewshot_cli(*args) -> list[str]:
    return [sys.executable, "-m", "fewshot", *map(str, args)]


def run_to_end(*args) -> subprocess.CompletedProcess:
    return subprocess.run(fewshot_cli(*args), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    result = run_to_end("train", *ARGS, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def wait_for_iteration(run_dir: Path, iteration: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        path = run_dir / "metrics.jsonl"
        if path.exists() and path.read_text().count("\n") >= iteration // 10:
            return
        time.sleep(0.02)
    raise AssertionError("the run did not get far enough to be interrupted")


def assert_same_run(a: Path, b: Path) -> None:
    final_a, final_b = load_state(a / STATE_FILE), load_state(b / STATE_FILE)
    assert final_a.iteration == final_b.iteration == 400
    for name, tensor in final_a.algorithm.items():
        assert torch.equal(tensor, final_b.algorithm[name]), name  # bitwise
    best_a, best_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    # No gap, no duplicate: the same records in the same order, losses identical.
    assert metrics(a) == metrics(b)


def test_sigkill_at_an_arbitrary_iteration_then_resume_is_bitwise_identical(
    uninterrupted, tmp_path
):
    out = tmp_path / "killed"
    process = subprocess.Popen(
        fewshot_cli("train", *ARGS, "--out", out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_iteration(out, 137, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = load_state(out / STATE_FILE).iteration
    assert 0 < interrupted_at < 400
    result = run_to_end("train", "--resume", out)
    assert result.returncode == 0, result.stderr
    assert_same_run(uninterrupted, out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_graceful_stop_writes_a_checkpoint_and_says_how_to_resume(uninterrupted, tmp_path, signum):
    out = tmp_path / "stopped"
    process = subprocess.Popen(
        fewshot_cli("train", *ARGS, "--out", out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_iteration(out, 60, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("stopped: by ") and f"--resume {out}" in last_line
    stopped_at = load_state(out / STATE_FILE).iteration
    assert metrics(out)[-1]["iteration"] <= stopped_at < 400
    assert run_to_end("train", "--resume", out).returncode == 0
    assert_same_run(uninterrupted, out)


def test_same_command_and_seed_give_identical_metrics(uninterrupted, tmp_path):
    result = run_to_end("train", *ARGS, "--out", tmp_path / "again")
    assert result.returncode == 0
    assert metrics(uninterrupted) == metrics(tmp_path / "again")


KILL_DURING_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from fewshot.training import state as st

    real_save = st.save_file

    def dying_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # leave a half-written file, then die
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    st.save_file = dying_save
    path = Path(sys.argv[1])
    state = st.load_state(path)
    state.iteration = 999
    st.save_state(path, state)
""")


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(uninterrupted, tmp_path):
    state_path = tmp_path / STATE_FILE
    state_path.write_bytes((uninterrupted / STATE_FILE).read_bytes())
    result = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, state_path], timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert list(tmp_path.glob("*.tmp")), "the write was under way when the process died"
    assert load_state(state_path).iteration == 400  # the previous checkpoint, intact


class PoisonedTasks:
    """Wraps a sampler and returns NaN inputs from the `at`-th meta-batch on."""

    def __init__(self, sampler, at):
        self.sampler, self.at, self.calls = sampler, at, 0

    def sample(self, num_tasks, generator=None):
        self.calls += 1
        tasks = self.sampler.sample(num_tasks, generator)
        if self.calls >= self.at:
            return type(tasks)(tasks.support_x * float("nan"), *tasks.tensors()[1:])
        return tasks


def test_divergence_stops_at_its_iteration_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    from fewshot.training import factory

    real_build = factory.build_sources

    def poisoned(*args, **kwargs):
        sources = real_build(*args, **kwargs)
        sources.train = PoisonedTasks(sources.train, at=33)
        return sources

    monkeypatch.setattr("fewshot.training.loop.build_sources", poisoned)
    config = TrainConfig(iterations=100, val_every=50, checkpoint_every=10, meta_batch=2)
    with pytest.raises(
        DivergenceError,
        match=r"diverged at iteration 33: loss is nan; the "
        r"checkpoint of iteration 30 is kept.*lower --inner-lr \(now 0.01\)",
    ):
        train(config, tmp_path / "run", progress=False)
    assert load_state(tmp_path / "run" / STATE_FILE).iteration == 30


def test_too_high_inner_rate_gets_one_line_from_the_command_line(tmp_path):
    result = run_to_end("train", *ARGS, "--inner-lr", "1e30", "--out", tmp_path / "r")
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("error: training diverged at iteration")
    )
    assert "Traceback" not in result.stderr


def stop_and_resume(
    args: list[str], stop_after: int, tmp_path: Path
) -> tuple[Path, Path, TrainingState]:
    """An uninterrupted run of `args` and one stopped by SIGTERM once `stop_after` iterations are
    logged, then resumed to the end; returns both folders and where the second was stopped."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_to_end("train", *args, "--out", straight).returncode == 0
    process = subprocess.Popen(
        fewshot_cli("train", *args, "--out", stopped),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_iteration(stopped, stop_after, process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    interrupted = load_state(stopped / STATE_FILE)
    assert run_to_end("train", "--resume", stopped).returncode == 0
    return straight, stopped, interrupted


def assert_same_final_state(straight: Path, stopped: Path, iterations: int) -> None:
    """Both runs ended at `iterations` with bitwise-equal weights, schedule state and metrics."""
    final_a, final_b = load_state(straight / STATE_FILE), load_state(stopped / STATE_FILE)
    assert final_a.iteration == final_b.iteration == iterations
    for name, tensor in final_a.algorithm.items():
        assert torch.equal(tensor, final_b.algorithm[name]), name
    assert final_a.scheduler == final_b.scheduler
    assert metrics(straight) == metrics(stopped)


REPTILE_ARGS = [
    "--algorithm",
    "reptile",
    "--iterations",
    "2000",
    "--val-every",
    "500",
    "--val-episodes",
    "10",
    "--checkpoint-every",
    "100000",
    "--test-episodes",
    "0",
]


def test_a_resumed_reptile_run_continues_its_annealed_outer_rate_exactly(tmp_path):
    """Reptile's epsilon is a schedule: the checkpoint must hold its state, or the resumed run
    would restart the annealing and end elsewhere."""
    straight, stopped, interrupted = stop_and_resume(REPTILE_ARGS, 300, tmp_path)
    assert 0 < interrupted.iteration < 2000 and interrupted.scheduler is not None
    assert_same_final_state(straight, stopped, 2000)


MAMLPP_ARGS = [
    "--algorithm",
    "maml++",
    "--iterations",
    "400",
    "--iterations-per-epoch",
    "100",
    "--da-epochs",
    "2",
    "--msl-epochs",
    "1",
    "--val-every",
    "200",
    "--val-episodes",
    "10",
    "--checkpoint-every",
    "100000",
    "--test-episodes",
    "0",
]


def test_a_maml_plus_plus_run_resumed_before_its_derivative_order_switch_is_bitwise_exact(
    tmp_path,
):
    """MAML++ switches from first to second order at iteration 200 (DA), its loss weights at 100
    (MSL) and anneals its outer rate (CA): a run stopped before the switches and resumed must
    make them at the same iterations and end bitwise where an uninterrupted run does."""
    straight, stopped, interrupted = stop_and_resume(MAMLPP_ARGS, 30, tmp_path)
    assert 0 < interrupted.iteration < 100
    assert_same_final_state(straight, stopped, 400)
    assert int(load_state(stopped / STATE_FILE).algorithm["iterations_done"]) == 400


FINETUNE_ARGS = [
    "--algorithm",
    "finetune",
    "--iterations",
    "3000",
    "--finetune-batch",
    "4",
    "--val-every",
    "500",
    "--val-episodes",
    "10",
    "--checkpoint-every",
    "100000",
    "--test-episodes",
    "0",
]


def test_a_resumed_pretraining_run_on_example_batches_is_bitwise_exact(tmp_path):
    """The non-episodic data source resumes where it stopped, and validation's fine-tuning
    mini-batches (drawn from a generator of its own) do not disturb training's random stream."""
    straight, stopped, interrupted = stop_and_resume(FINETUNE_ARGS, 400, tmp_path)
    assert 0 < interrupted.iteration < 3000
    assert_same_final_state(straight, stopped, 3000)
