"""The dataset registry: a dataset is one module and one `register` call, trained and evaluated
from the command line with nothing else changed."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from fewshot.cli import main
from fewshot.datasets.registry import DATASETS, Dataset, get_dataset, register
from fewshot.errors import ConfigError
from fewshot.training.config import run_setting_names

CLASSES = {"train": range(0, 12), "val": range(12, 16), "test": range(16, 20)}


def blobs(config, data_root, download: bool, parts: tuple[str, ...]):
    """Gaussian clusters of 8 features, 20 rows per class; each part its own classes."""
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(20, 8, generator=generator) * 3
    loaded = []
    for part in parts:
        labels = torch.tensor(CLASSES[part]).repeat_interleave(20)
        rows = means[labels] + torch.randn(len(labels), 8, generator=generator)
        loaded.append((rows, labels, None))
    return loaded


@pytest.fixture
def toy_dataset():
    """A dataset registered from inside the test, and removed after it."""
    entry = register(
        Dataset(
            "blobs",
            task="classification",
            inputs="vectors",
            network="table-mlp",
            defaults_from=("omniglot",),
            settings=("features", "sampler"),
            values={"sampler": "fixed"},
            load=blobs,
            from_data=("features",),
        )
    )
    yield entry
    del DATASETS[entry.name]


def test_a_registered_dataset_trains_and_evaluates_from_the_command_line(tmp_path, toy_dataset):
    out = tmp_path / "run"
    trained = CliRunner().invoke(
        main,
        ["train", "--dataset", "blobs", "--algorithm", "protonet", "--ways", "3",
         "--train-ways", "3", "--shots", "1", "--iterations", "4", "--val-every", "2",
         "--val-episodes", "4", "--test-episodes", "0", "--out", str(out)],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["features"], config["sampler"]) == ("blobs", 8, "fixed")
    assert "split" not in config and "backbone" not in config  # other datasets' settings
    evaluated = CliRunner().invoke(main, ["eval", str(out), "--episodes", "10", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output.strip().splitlines()[-1])
    assert report["dataset"] == "blobs" and report["ways"] == 3
    assert 0 <= report["accuracy"] <= 1


def test_a_name_is_registered_once_and_an_unknown_one_is_refused(toy_dataset):
    with pytest.raises(ValueError, match="already registered"):
        register(toy_dataset)
    with pytest.raises(ConfigError, match="unknown dataset 'nope'; choose one of sinusoid, "):
        get_dataset("nope")


def test_the_registered_datasets_name_only_run_settings():
    names = set(run_setting_names())
    for entry in DATASETS.values():
        assert set(entry.settings) | set(entry.values) | set(entry.required) <= names, entry.name
        assert set(entry.from_data) <= names, entry.name
