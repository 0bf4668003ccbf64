"""Distributed meta-training on torch.distributed's real engine: torchrun, 2 gloo processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fewshot.algorithms import METHODS
from fewshot.cli import main
from fewshot.errors import ConfigError
from fewshot.tasks import Task, stream_generator
from fewshot.training import distributed
from fewshot.training.checkpoint import read_config, read_metrics
from fewshot.training.distributed import (
    World,
    backend_for,
    backend_reason,
    from_another_process,
    rank_device,
)
from fewshot.training.factory import build_algorithm, build_sources
from fewshot.training.loop import meta_step, seed_everything
from fewshot.training.state import STATE_FILE, load_state

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
# A hung job fails the test by this limit (a job ends in well under a minute here).
JOB_LIMIT = 300
SINUSOID = [
    *("--dataset", "sinusoid", "--algorithm", "maml", "--meta-batch", "16"),
    *("--val-every", "10", "--val-episodes", "10", "--test-episodes", "0", "--device", "cpu"),
]


def torchrun(processes: int, *command: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node PROCESSES COMMAND...`, one thread per process."""
    return subprocess.run(
        [*TORCHRUN, str(processes), *command],
        capture_output=True,
        text=True,
        timeout=JOB_LIMIT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def train(processes: int, *options: str) -> subprocess.CompletedProcess:
    """`fewshot train` in `processes` processes; a new run gets the SINUSOID settings."""
    settings = [] if "--resume" in options else SINUSOID
    result = torchrun(processes, "-m", "fewshot", "train", *settings, *options)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """20 iterations of MAML on sinusoids, 2 processes with 8 tasks each per meta-batch."""
    run = tmp_path_factory.mktemp("distributed") / "run"
    train(2, "--iterations", "20", "--out", str(run))
    return run


def concatenated(parts: list[Task]) -> Task:
    return Task(*(torch.cat(tensors) for tensors in zip(*(p.tensors() for p in parts))))


@pytest.mark.slow
def test_two_processes_end_where_one_process_does_with_the_whole_meta_batch(two_process_run):
    """One process taking each step on the 16 tasks both processes drew (8 from each rank's
    stream) ends with the same parameters as the 2-process run."""
    config = read_config(two_process_run)
    seed_everything(config.seed)
    algorithm = build_algorithm(config)
    initial = {k: v.clone() for k, v in algorithm.state_dict().items()}
    optimizer, schedule = algorithm.configure_optimizers(config.outer_lr, config.iterations)
    sampler = build_sources(config, parts=("train",)).train
    streams = [stream_generator(World(rank, 2).stream("train"), config.seed) for rank in range(2)]
    for _ in range(config.iterations):
        tasks = concatenated([sampler.sample(8, stream) for stream in streams])
        meta_step(algorithm, optimizer, tasks, schedule)

    state = load_state(two_process_run / STATE_FILE)
    assert state.iteration == 20 and state.processes == 2 and len(state.other_ranks) == 1
    for name, value in algorithm.state_dict().items():
        torch.testing.assert_close(state.algorithm[name], value, rtol=1e-4, atol=1e-5)
        assert not torch.equal(value, initial[name]), name  # training moved every tensor


@pytest.mark.slow
def test_resuming_with_as_many_processes_is_bitwise_exact(two_process_run, tmp_path):
    """10 iterations, then resumed to 20, end bit for bit where 20 without a stop end."""
    run = tmp_path / "run"
    train(2, "--iterations", "10", "--out", str(run))
    train(2, "--resume", str(run), "--iterations", "20")

    resumed, whole = load_state(run / STATE_FILE), load_state(two_process_run / STATE_FILE)
    for name, value in whole.algorithm.items():
        assert torch.equal(resumed.algorithm[name], value), name
    moments = whole.optimizer["state"]
    for index, entry in moments.items():
        for key, value in entry.items():
            assert torch.equal(resumed.optimizer["state"][index][key], value), (index, key)
    assert torch.equal(resumed.other_ranks[0]["sampler_rng"], whole.other_ranks[0]["sampler_rng"])

    def without_times(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert without_times(read_metrics(run)) == without_times(read_metrics(two_process_run))


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_is_refused_in_one_line(
    two_process_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(two_process_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = CliRunner().invoke(main, ["train", "--resume", str(run), "--iterations", "30"])
    assert result.exit_code == 2
    assert "was trained by 2 processes and this is 1" in result.output
    assert "torchrun starting 2 processes in all" in result.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written


@pytest.mark.slow
def test_every_method_takes_the_same_step_on_two_processes_as_on_one():
    result = torchrun(2, str(HERE / "distributed_steps.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in METHODS:  # process 0's lines; a failed check on either fails the job
        assert f"same step: {name}" in lines, name
    assert "agreed: a stop request on one process stops both" in lines
    assert "agreed: a non-finite loss on one process stops both" in lines


@pytest.mark.slow
def test_a_failing_process_ends_the_whole_job_with_its_message(tmp_path):
    """Process 1 raises at its fifth step; process 0, waiting in the gradient all-reduce, stops
    with one line instead of waiting forever, and the job fails (within JOB_LIMIT)."""
    result = torchrun(
        2, str(HERE / "failing_rank.py"), "train", *SINUSOID, "--iterations", "20",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "RuntimeError: injected failure in process 1 at step 5" in output
    assert "error: process 0 of 2: another process of this run stopped" in output
    assert load_state(tmp_path / "run" / STATE_FILE).iteration == 0  # resumable from there


def test_a_meta_batch_is_shared_as_evenly_as_it_can_be():
    assert World(1, 4).share(16) == 4
    assert [World(r, 2).share(25) for r in range(2)] == [13, 12]  # the sinusoid's default
    assert [World(r, 3).share(16) for r in range(3)] == [6, 5, 5]
    with pytest.raises(ConfigError, match="leaves some of the 3 processes without a task"):
        World(0, 3).share(2)


def test_each_rank_has_its_own_streams_and_rank_zero_keeps_the_single_process_ones():
    assert World(0, 2).stream("train") == World().stream("train") == "train"
    assert World(1, 2).stream("train") != World(2, 3).stream("train")
    assert World(0, 2).seed(7) == 7 and World(1, 2).seed(7) != 7


def test_each_process_takes_the_gpu_of_its_local_rank_and_the_backend_follows_the_device(
    monkeypatch,
):
    # this machine has no GPU: the device count is faked at 2, as on a 2-GPU machine
    monkeypatch.setattr(distributed, "accelerator_count", lambda kind: 2)
    assert rank_device(World(3, 4, local_rank=1), "cuda") == "cuda:1"
    assert rank_device(World(3, 4, local_rank=1), "cpu") == "cpu"
    assert rank_device(World(), "cuda:1") == "cuda:1"  # one process: as given
    assert rank_device(World(), "mps") == "mps"
    with pytest.raises(ConfigError, match="each of the 4 processes needs its own"):
        rank_device(World(3, 4, local_rank=1), "cuda:1")
    with pytest.raises(ConfigError, match="would take GPU 2, but this machine has 2"):
        rank_device(World(2, 4, local_rank=2), "cuda")
    with pytest.raises(ConfigError, match="trains on CPUs \\(gloo\\) or CUDA GPUs"):
        rank_device(World(1, 2), "mps")
    assert backend_for("cuda:1") == "nccl" and backend_for("cpu") == "gloo"


def test_only_errors_of_a_gone_process_are_reported_as_such():
    assert from_another_process(RuntimeError("[pair.cc:553] Connection closed by peer [1.2.3.4]"))
    assert not from_another_process(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    reason = backend_reason(RuntimeError("[pair.cc:553] Connection closed by peer [::1]:5. More"))
    assert reason == "Connection closed by peer [::1]:5"


@pytest.mark.slow
def test_config_of_a_distributed_run_records_the_whole_meta_batch(two_process_run):
    document = json.loads((two_process_run / "config.json").read_text())
    assert document["meta_batch"] == 16
