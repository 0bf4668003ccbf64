"""Run-folder weights and resumable checkpoints: damaged or missing files are refused in one
line that says what to do."""

import random

import numpy as np
import pytest
import torch

from fewshot.errors import CheckpointError
from fewshot.training.checkpoint import CONFIG_FILE, load_weights, save_weights
from fewshot.training.state import (
    STATE_FILE,
    TrainingState,
    load_state,
    save_state,
    saved_iteration,
)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_holding_a_non_finite_value_are_refused_by_file_and_tensor(tmp_path, bad):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].bias[1] = bad
    path = tmp_path / "model.safetensors"
    save_weights(model, path)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with pytest.raises(CheckpointError) as refused:
        load_weights(fresh, path)
    message = str(refused.value)
    assert f"{path} is damaged: 1.bias holds NaN or infinite values" in message
    assert "fewshot train --out" in message and "\n" not in message


def test_missing_weights_of_a_run_advise_resuming_it_and_of_no_run_training(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="train first with `fewshot train --out"):
        load_weights(model, tmp_path / "model.safetensors")
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(CheckpointError) as refused:
        load_weights(model, tmp_path / "model.safetensors")
    assert f"continue it with `fewshot train --resume {tmp_path}`" in str(refused.value)
    assert "--out" not in str(refused.value)


def a_state(weight: torch.Tensor) -> TrainingState:
    return TrainingState(
        iteration=3,
        algorithm={"net.weight": weight},
        optimizer={"state": {}, "param_groups": []},
        sampler_rng=torch.Generator().get_state(),
        torch_rng=torch.get_rng_state(),
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(),
        best=None,
        elapsed=1.0,
    )


def test_resumable_checkpoint_holding_nan_is_refused_by_file_and_tensor(tmp_path):
    path = tmp_path / STATE_FILE
    save_state(path, a_state(torch.ones(2, 2)))
    assert load_state(path).iteration == 3
    save_state(path, a_state(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])))
    with pytest.raises(CheckpointError) as refused:
        load_state(path)
    message = str(refused.value)
    assert f"{path} is damaged: algorithm.net.weight holds NaN or infinite values" in message
    assert "cannot be resumed" in message and "fewshot train --out" in message
    assert "\n" not in message


def test_a_checkpoints_iteration_is_read_from_its_header_alone(tmp_path):
    path = tmp_path / STATE_FILE
    save_state(path, a_state(torch.ones(2, 2)))
    assert saved_iteration(path) == load_state(path).iteration == 3
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a readable fewshot checkpoint"):
        saved_iteration(path)


@pytest.mark.parametrize(
    "algorithm, name, recorded, today",
    [
        ("relationnet", "support_pooling", "sum", "mean"),
        ("matchingnet", "similarity_scale", 1, 100),
    ],
)
def test_a_run_recorded_before_a_setting_existed_keeps_the_value_it_was_trained_with(
    tmp_path, algorithm, name, recorded, today
):
    """A config.json without the setting reads as the behaviour the run was trained with; a
    new run, and a config that names the setting, get what they say."""
    import json

    from fewshot.training.checkpoint import read_config, write_config
    from fewshot.training.config import TrainConfig

    write_config(tmp_path, TrainConfig(algorithm=algorithm, dataset="omniglot").resolved())
    document = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert document[name] == today
    del document[name]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(document))
    assert getattr(read_config(tmp_path).settings, name) == recorded
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**document, name: today}))
    assert getattr(read_config(tmp_path).settings, name) == today
