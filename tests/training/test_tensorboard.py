"""--tensorboard: the run's metrics as TensorBoard scalars, read back with TensorBoard's reader."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fewshot.cli import main
from fewshot.training.config import TrainConfig
from fewshot.training.loop import train
from fewshot.training.tensorboard import TensorBoardLogger

# Every test here trains.
pytestmark = pytest.mark.slow


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("resumed", [False, True], ids=["straight", "stopped-and-resumed"])
def test_tensorboard_holds_the_same_scalars_as_metrics_jsonl(tmp_path, resumed):
    config = TrainConfig(iterations=40, val_every=20, val_episodes=5, checkpoint_every=10)
    run = tmp_path / "run"
    if resumed:
        # killed at iteration 30 after its metrics line, before its checkpoint: the resumed
        # run replays 21..30 from the checkpoint of iteration 20 and logs 30 again
        def killed_at_30(record):
            if record["iteration"] == 30:
                raise KeyboardInterrupt

        first = TensorBoardLogger(run)
        with pytest.raises(KeyboardInterrupt):
            train(config, run, progress=False, listeners=[first, killed_at_30])
        first.close()
    logger = TensorBoardLogger(run)
    train(config, run, progress=False, resume=resumed, listeners=[logger])
    logger.close()

    logged = scalars(run / "tensorboard")
    lines = metrics(run)
    expected_loss = [(r["iteration"], r["loss"]) for r in lines if "split" not in r]
    expected_val = [(r["iteration"], r["mse"]) for r in lines if r.get("split") == "val"]
    assert [s for s, _ in logged["train/loss"]] == [s for s, _ in expected_loss]
    assert [v for _, v in logged["train/loss"]] == pytest.approx([v for _, v in expected_loss])
    assert logged["val/mse"] == [(s, pytest.approx(v)) for s, v in expected_val]
    assert "val/ci95" in logged and "train/seconds" in logged


def test_the_train_command_logs_for_tensorboard_when_asked(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        ["train", "--iterations", "20", "--val-every", "10", "--val-episodes", "5",
         "--test-episodes", "0", "--tensorboard", "--out", str(run)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    logged = scalars(run / "tensorboard")
    assert [s for s, _ in logged["val/mse"]] == [10, 20]
    assert [v for _, v in logged["val/mse"]] == pytest.approx(
        [r["mse"] for r in metrics(run) if r.get("split") == "val"]
    )
