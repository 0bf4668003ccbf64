"""--normalize and --augment for image folders: the transforms against hand computations, and a
run that uses them records, evaluates and resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import fewshot
from fewshot.cli import main
from fewshot.datasets.image_folder import load_image_folder
from fewshot.datasets.transforms import ImageTransform, parse_augment, pixel_statistics
from fewshot.errors import ConfigError
from fewshot.training.loading import load_run
from fewshot.training.state import STATE_FILE
from tests.conftest import write_random_image_folder


def test_flips_and_crops_are_the_drawn_ones():
    x = torch.rand(6, 2, 16, 16, dtype=torch.float64)
    out = ImageTransform(augment=("flip", "crop"))(x, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    flipped = (torch.rand(6, generator=replay) < 0.5).numpy()
    top = torch.randint(0, 5, (6,), generator=replay).numpy()
    left = torch.randint(0, 5, (6,), generator=replay).numpy()
    for i in range(6):
        image = x[i].numpy()[:, :, ::-1] if flipped[i] else x[i].numpy()
        padded = np.pad(image, ((0, 0), (2, 2), (2, 2)), mode="reflect")
        expected = padded[:, top[i] : top[i] + 16, left[i] : left[i] + 16]
        np.testing.assert_array_equal(out[i].numpy(), expected)


def test_standardisation_uses_the_training_images_statistics():
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    mean, std = pixel_statistics(images)
    pixels = images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(std, pixels.transpose(1, 0, 2, 3).reshape(3, -1).std(1, ddof=1))
    x = images.float() / 255
    out = ImageTransform(tuple(mean), tuple(std))(x.unsqueeze(0))[0]
    expected = (pixels - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_statistics_read_in_chunks_are_those_of_the_whole_set():
    """A dataset read a few images at a time (as a memory-mapped tieredImageNet is) has the
    statistics that numpy computes on all of it at once."""
    images = torch.randint(0, 256, (11, 3, 5, 7), dtype=torch.uint8)
    pixels = images.numpy().astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    mean, std = pixel_statistics(images, chunk=3)
    np.testing.assert_allclose(mean, pixels.mean(1), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(1, ddof=1), rtol=1e-12)


def test_unknown_augmentations_are_refused():
    assert parse_augment("flip, crop") == ("flip", "crop")
    with pytest.raises(ConfigError, match="unknown rotate; choose among flip, crop"):
        parse_augment("flip,rotate")


@pytest.mark.slow
def test_a_normalised_augmented_run_records_evaluates_and_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    write_random_image_folder(data, channels=3)
    common = ["train", "--algorithm", "protonet", "--dataset", "folder", "--data-root",
              str(data), "--image-size", "16", "--ways", "3", "--train-ways", "3", "--shots",
              "1", "--queries", "2", "--train-queries", "2", "--val-every", "10",
              "--val-episodes", "5", "--checkpoint-every", "10", "--test-episodes", "0",
              "--normalize", "--augment", "flip,crop"]  # fmt: skip
    runner = CliRunner()

    def ok(*args):
        result = runner.invoke(main, [*map(str, args)])
        assert result.exit_code == 0, result.output

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(*common, "--iterations", "20", "--out", straight)
    ok(*common, "--iterations", "10", "--out", resumed)
    ok("train", "--resume", resumed, "--iterations", "20")
    a, b = load_file(straight / STATE_FILE), load_file(resumed / STATE_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)

    config = json.loads((straight / "config.json").read_text())
    assert (config["normalize"], config["augment"], config["channels"]) == (True, "flip,crop", 3)
    recorded = json.loads((straight / "preprocessing.json").read_text())
    assert recorded["mean"] == config["pixel_mean"] and len(recorded["std"]) == 3
    ok("eval", straight, "--episodes", "10", "--json")
    ok(*common[:-2], "--iterations", "20", "--out", tmp_path / "plain")
    c = load_file(tmp_path / "plain" / STATE_FILE)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # augmentation changed the training
    # adapt reads a user's image exactly as the run's evaluation episodes see it
    _, _, sources = load_run(straight)
    files = sorted((data / "test" / "c0").iterdir())
    images, _ = fewshot.load(straight).preprocessing.read_images(files)
    folder, _, _ = load_image_folder(data / "test", 16, 3)
    expected = sources.test.transform(folder[: len(files)].float() / 255)
    torch.testing.assert_close(images, expected)
