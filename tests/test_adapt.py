"""`fewshot adapt` and `fewshot.load`: a trained model adapted to a user's own image folders.

The folders are made here from held-out Omniglot drawings saved as ordinary black-on-white
PNGs (the way a user draws), and the predictions are checked against the same model's
`predict` on the same drawings as the training pipeline decoded them.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps

import fewshot
from fewshot.cli import main
from fewshot.datasets.omniglot import omniglot_split
from fewshot.datasets.preprocessing import Preprocessing, background_of
from fewshot.tasks import Task
from fewshot.training.evaluation import evaluate

REPO = Path(__file__).resolve().parents[1]
PROTONET = REPO / "zoo" / "protonet-omniglot-5w1s"
MAML = REPO / "zoo" / "maml-omniglot-5w1s-cpu"
OMNIGLOT = Preprocessing(28, 1, "dark", "Omniglot")


spec = importlib.util.spec_from_file_location(
    "omniglot_folders", REPO / "scripts" / "omniglot_folders.py"
)
omniglot_folders = importlib.util.module_from_spec(spec)
spec.loader.exec_module(omniglot_folders)


@pytest.fixture(scope="module")
def drawings(omniglot_root, omniglot):
    return omniglot_folders.Drawings(omniglot_root, omniglot)


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_episode(drawings, folder: Path, characters, shots: int, queries: int, invert=False):
    """The episode's PNG folders (scripts/omniglot_folders.py), and the same episode as a Task
    of the images the training pipeline cached, in the order the folders are read: classes by
    name, queries by file name."""
    written = omniglot_folders.write_episode(drawings, folder, characters, shots, queries, invert)
    names = sorted(drawings.name(c) for c in characters)
    label = {drawings.name(c): i for c in characters for i in [names.index(drawings.name(c))]}
    order = lambda item: (label[drawings.name(item[0])], item[1])  # noqa: E731
    support = sorted((w for w in written if w[2] == "support"), key=order)
    query = sorted((w for w in written if w[2] == "query"), key=order)

    def batch(items):
        images = torch.stack([drawings.cached(c, d) for c, d, _ in items])
        return images.unsqueeze(1).unsqueeze(0).float() / 255

    labels = lambda items: torch.tensor([[label[drawings.name(c)] for c, _, _ in items]])  # noqa: E731
    return Task(batch(support), labels(support), batch(query), labels(query)), names


def run_adapt(*args) -> dict:
    result = CliRunner().invoke(main, ["adapt", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.omniglot
def test_a_users_drawing_reaches_the_model_exactly_as_omniglots_training_data(drawings, tmp_path):
    for character in drawings.test[:3]:
        for drawing in (0, 7):
            png = drawings.png(character, drawing)
            black_on_white = save(png, tmp_path / "bw.png")
            white_on_black = save(ImageOps.invert(png), tmp_path / "wb.png")
            on_rgb_paper = save(png.convert("RGB"), tmp_path / "rgb.png")  # gray saved as RGB
            expected = drawings.cached(character, drawing)
            for path, inverted in ((black_on_white, True), (white_on_black, False)):
                image, was_inverted = OMNIGLOT.read(path)
                assert was_inverted is inverted
                assert torch.equal(image[0], expected)
            assert torch.equal(OMNIGLOT.read(on_rgb_paper)[0][0], expected)
            not_inverted, _ = OMNIGLOT.read(black_on_white, invert="never")
            assert torch.equal(not_inverted[0], 255 - expected)


@pytest.mark.omniglot
@pytest.mark.parametrize("run", [PROTONET, MAML], ids=["protonet", "maml"])
def test_adapt_command_predicts_what_the_model_predicts_on_the_same_episode(
    run, drawings, tmp_path
):
    task, names = make_episode(drawings, tmp_path, drawings.test[10:15], shots=1, queries=3)
    out = tmp_path / "predictions.json"
    run_adapt(run, "--support", tmp_path / "support", "--predict", tmp_path / "queries",
              "--output", out)  # fmt: skip
    written = json.loads(out.read_text())
    assert written["classes"] == names
    rows = written["predictions"]
    probabilities = torch.tensor([list(r["probabilities"].values()) for r in rows])
    assert all(r["inverted"] for r in rows)  # black-on-white, inverted

    method = fewshot.load(run)  # inductive batch norm
    expected = torch.softmax(method.predict(task)[0], -1)
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=0)
    predicted = [r["prediction"] for r in rows]
    assert predicted == [names[i] for i in expected.argmax(-1).tolist()]


@pytest.mark.omniglot
def test_white_on_black_drawings_give_the_same_predictions_and_forced_inversion_changes_them(
    drawings, tmp_path
):
    _, names = make_episode(drawings, tmp_path / "bw", drawings.test[20:25], shots=1, queries=2)
    make_episode(drawings, tmp_path / "wb", drawings.test[20:25], shots=1, queries=2, invert=True)
    outputs = {}
    for name, extra in (("bw", []), ("wb", []), ("wb-always", ["--invert", "always"])):
        folder = tmp_path / name.split("-")[0]
        out = tmp_path / f"{name}.csv"
        run_adapt(PROTONET, "--support", folder / "support", "--predict", folder / "queries",
                  "--output", out, *extra)  # fmt: skip
        lines = out.read_text().splitlines()
        assert lines[0] == ",".join(["image", "prediction", "inverted", *names])
        outputs[name] = [line.split(",")[1:] for line in lines[1:]]
    assert [row[1] for row in outputs["bw"]] == ["1"] * 10
    assert [row[1] for row in outputs["wb"]] == ["0"] * 10
    assert [row[0] for row in outputs["bw"]] == [row[0] for row in outputs["wb"]]
    assert [row[2:] for row in outputs["bw"]] == [row[2:] for row in outputs["wb"]]
    assert [row[2:] for row in outputs["wb-always"]] != [row[2:] for row in outputs["wb"]]


@pytest.mark.omniglot
@pytest.mark.slow
def test_adapt_accuracy_on_user_folders_comes_near_fewshot_eval(drawings, omniglot, tmp_path):
    """Many 5-way 1-shot episodes of held-out characters, adapted from PNG folders through the
    Python API, against the evaluation protocol's figure for the same model and policy."""
    method = fewshot.load(PROTONET)
    generator = torch.Generator().manual_seed(0)
    correct = []
    for episode in range(40):
        picks = torch.randperm(len(drawings.test), generator=generator)[:5].tolist()
        folder = tmp_path / f"episode{episode}"
        task, names = make_episode(
            drawings, folder, [drawings.test[i] for i in picks], shots=1, queries=5
        )
        support, _ = method.preprocessing.read_support(folder / "support")
        queries = sorted((folder / "queries").iterdir())
        images, _ = method.preprocessing.read_images(queries)
        predicted = method.adapt(support).predict(images)
        truth = [names[i] for i in task.query_y[0].tolist()]
        correct.append(np.mean([p == t for p, t in zip(predicted, truth)]))
    accuracy = float(np.mean(correct))
    ci = 1.96 * float(np.std(correct, ddof=1)) / math.sqrt(len(correct))

    images, labels = omniglot_split(omniglot, "vinyals", "test", rotations=False)
    sampler = fewshot.TaskSampler(images, labels, ways=5, shots=1, queries=5)
    reference = evaluate(method, sampler, episodes=200, seed=0)
    print(f"adapt from folders: {accuracy:.4f} ± {ci:.4f}; evaluate: {reference}")
    assert abs(accuracy - reference.mean) < 2 * math.hypot(ci, reference.ci95) + 0.01


def test_one_clear_line_for_each_bad_input(tmp_path):
    run = PROTONET
    rng = np.random.default_rng(0)

    def drawing(path, rgb=False):
        pixels = np.full((40, 40), 255, np.uint8)
        pixels[10:30, rng.integers(5, 30)] = 0
        image = Image.fromarray(pixels)
        if rgb:
            image = image.convert("RGB")
            image.putpixel((20, 20), (255, 0, 0))
        return save(image, path)

    support = tmp_path / "support"
    for c in ("a", "b"):
        drawing(support / c / "1.png")
    query = drawing(tmp_path / "q.png")

    def error_of(*args):
        result = CliRunner().invoke(main, ["adapt", str(run), *map(str, args)])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        return lines[0]

    empty = tmp_path / "empty-class"
    (empty / "a").mkdir(parents=True)
    drawing(empty / "b" / "1.png")
    assert "holds no images; each class needs at least one" in error_of(
        "--support", empty, "--predict", query
    )
    one_class = tmp_path / "one"
    drawing(one_class / "a" / "1.png")
    assert "needs at least 2 classes" in error_of("--support", one_class, "--predict", query)
    loose = tmp_path / "loose"
    for c in ("a", "b"):
        drawing(loose / c / "1.png")
    drawing(loose / "stray.png")
    assert "outside class folders (stray.png)" in error_of("--support", loose, "--predict", query)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert f"{broken} is not an image that can be read" in error_of(
        "--support", support, "--predict", broken
    )
    colour = drawing(tmp_path / "colour.png", rgb=True)
    assert "is a colour image but the model was trained on grayscale" in error_of(
        "--support", support, "--predict", colour
    )
    assert "write to a .csv or a .json file" in error_of(
        "--support", support, "--predict", query, "--output", tmp_path / "out.txt"
    )
    assert not (tmp_path / "out.txt").exists()
    assert "--inner-steps does not apply" in error_of(  # ProtoNet adapts without steps
        "--support", support, "--predict", query, "--inner-steps", 3
    )
    many = tmp_path / "many"
    for c in "abcdef":
        drawing(many / c / "1.png")
    result = CliRunner().invoke(
        main, ["adapt", str(MAML), "--support", str(many), "--predict", str(query)]
    )
    assert result.exit_code == 2
    assert "the support set has 6 classes but this model's head has 5 outputs" in result.output
    # a ProtoNet has no head: six classes are fine, and colour converts on request
    result = run_adapt(run, "--support", many, "--predict", colour, "--convert")
    assert "prediction" in result.output.splitlines()[1]


def test_fewer_classes_than_a_fixed_head_predict_among_the_supports_classes(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b", "c"):
        for i in range(2):
            pixels = np.full((28, 28), 255, np.uint8)
            pixels[rng.integers(0, 20) :, rng.integers(0, 20)] = 0
            save(Image.fromarray(pixels), tmp_path / "support" / c / f"{i}.png")
    method = fewshot.load(MAML)
    support, inverted = method.preprocessing.read_support(tmp_path / "support")
    assert inverted == [True] * 6
    probabilities = method.adapt(support).probabilities(support.x)
    assert probabilities.shape == (6, 3)
    # the head's first three outputs, those the support's labels 0..2 adapted
    logits = method.adapt_tasks(support.x[None], support.y[None])(support.x[None])[0]
    assert logits.shape == (6, 5)
    torch.testing.assert_close(probabilities, torch.softmax(logits[:, :3], -1))


@pytest.mark.parametrize("run", [PROTONET, MAML], ids=["protonet", "maml"])
def test_a_prediction_does_not_depend_on_the_other_images_predicted_with_it(run, tmp_path):
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.random((7, 1, 28, 28), dtype=np.float32))
    support = fewshot.Support(images[:4], torch.tensor([0, 0, 1, 1]), ["a", "b"])
    predictor = fewshot.load(run).adapt(support)
    together = predictor(images[4:])
    alone = torch.cat([predictor(images[i : i + 1]) for i in range(4, 7)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_background_of_training_images():
    dark = torch.zeros(20, 1, 16, 16, dtype=torch.uint8)
    dark[:, :, 4:12, 4:12] = 255
    assert background_of(dark) == "dark"
    assert background_of(255 - dark) == "light"
    mixed = torch.cat([dark[:10], 255 - dark[:10]])
    assert background_of(mixed) is None
    photos = Preprocessing(16, 1, None)
    assert not photos.should_invert(np.full((16, 16), 255, np.uint8))


def product_photo(rng, colour, on: int) -> Image.Image:
    """A coloured square at a random place on a uniform background of brightness `on`."""
    pixels = np.full((24, 24, 3), on, np.uint8)
    top, left = rng.integers(2, 12, size=2)
    pixels[top : top + 10, left : left + 10] = colour
    return Image.fromarray(pixels)


@pytest.mark.slow
def test_a_colour_folder_run_records_its_dark_background_and_keeps_photos_on_black(tmp_path):
    """No --channels: the colour of the photos makes a 3-channel run."""
    rng = np.random.default_rng(3)
    colours = rng.integers(60, 256, size=(12, 3))
    parts = {"train": range(6), "val": range(6, 9), "test": range(9, 12)}
    for part, classes in parts.items():
        for c in classes:
            for i in range(6):
                path = tmp_path / "data" / part / f"c{c}" / f"{i}.png"
                save(product_photo(rng, colours[c], 0), path)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        ["train", "--algorithm", "protonet", "--dataset", "folder", "--data-root",
         str(tmp_path / "data"), "--image-size", "16", "--ways", "3",
         "--train-ways", "3", "--shots", "1", "--queries", "2", "--iterations", "10",
         "--val-every", "10", "--val-episodes", "5", "--test-episodes", "0", "--out", str(run)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    recorded = json.loads((run / "preprocessing.json").read_text())
    assert (recorded["image_size"], recorded["channels"], recorded["background"]) == (16, 3, "dark")

    for c in (0, 1):
        save(product_photo(rng, colours[9 + c], 0), tmp_path / "support" / f"p{c}" / "1.png")
    save(product_photo(rng, colours[9], 0), tmp_path / "on-black.png")
    save(product_photo(rng, colours[9], 255), tmp_path / "on-white.png")
    out = tmp_path / "out.json"
    run_adapt(run, "--support", tmp_path / "support", "--predict", tmp_path / "on-black.png",
              tmp_path / "on-white.png", "--output", out)  # fmt: skip
    rows = json.loads(out.read_text())["predictions"]
    assert [r["inverted"] for r in rows] == [False, True]
    method = fewshot.load(run)
    photo, inverted = method.preprocessing.read(tmp_path / "on-black.png")
    assert photo.shape == (3, 16, 16) and not inverted
    gray = save(Image.new("L", (24, 24), 0), tmp_path / "gray.png")
    with pytest.raises(fewshot.errors.DataError, match="is a grayscale image but the model"):
        method.preprocessing.read(gray)


def test_a_transductive_prediction_normalises_all_the_images_together(tmp_path):
    """Beyond the inductive policy's chunks of 64: 70 images are one batch, as the policy says."""
    rng = np.random.default_rng(4)
    images = torch.from_numpy(rng.random((80, 1, 28, 28), dtype=np.float32))
    support = fewshot.Support(images[:10], torch.arange(5).repeat(2), list("abcde"))
    method = fewshot.load(MAML, batch_norm="transductive")
    predicted = method.adapt(support)(images[10:])
    expected = method.adapt_tasks(support.x[None], support.y[None])(images[None, 10:])[0]
    torch.testing.assert_close(predicted, expected)


def test_transparent_images_are_read_alike_for_training_and_adapting(tmp_path):
    """Black strokes on a transparent background: white where transparent, in both readers."""
    from fewshot.datasets.image_folder import load_image_folder

    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 18:22, 3] = 255  # opaque black strokes, the rest transparent black
    for c in ("a", "b"):
        save(Image.fromarray(rgba), tmp_path / "folder" / c / "1.png")
    trained, _, _ = load_image_folder(tmp_path / "folder", image_size=28, channels=1)
    read, inverted = Preprocessing(28, 1, None).read(tmp_path / "folder" / "a" / "1.png")
    assert torch.equal(read, trained[0])
    assert int(read[0, 0, 0]) == 255 and not inverted


@pytest.mark.parametrize(
    "x, y, classes, message",
    [
        (torch.zeros(3, 2), torch.tensor([0, 1]), ["a", "b"], "3 inputs has 2 labels"),
        (torch.zeros(2, 2), torch.tensor([0, 0]), ["a"], "at least 2 classes"),
        (torch.zeros(2, 2), torch.tensor([0, 2]), ["a", "b"], "must lie in 0..1"),
        (torch.zeros(2, 2), torch.tensor([0, 0]), ["a", "b"], "class 'b' has no example"),
    ],
)
def test_a_support_set_is_checked(x, y, classes, message):
    with pytest.raises(fewshot.errors.DataError, match=message):
        fewshot.Support(x, y, classes)
