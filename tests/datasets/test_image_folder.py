"""A user's own image folder: mixed inputs are converted, bad ones refused by name."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fewshot.cli import main
from fewshot.datasets.image_folder import load_image_folder
from fewshot.errors import DataError


def save(path, size=(20, 20), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).convert(mode).save(path)


def test_mixed_sizes_and_modes_are_converted(tmp_path):
    save(tmp_path / "a" / "1.png", (40, 30), "RGBA", 10)
    save(tmp_path / "a" / "2.jpg", (10, 10), "RGB", 200)
    save(tmp_path / "b" / "1.png", (28, 28), "1", 255)
    save(tmp_path / "b" / "2.bmp", (64, 64), "P", 77)
    (tmp_path / "b" / ".DS_Store").write_bytes(b"\0\1")
    images, labels, names = load_image_folder(tmp_path, image_size=28, channels=1)
    assert images.shape == (4, 1, 28, 28) and labels.tolist() == [0, 0, 1, 1]
    assert names == ["a", "b"]
    assert abs(int(images[1].float().mean()) - 200) <= 2
    rgb, _, _ = load_image_folder(tmp_path, image_size=16, channels=3)
    assert rgb.shape == (4, 3, 16, 16)


def test_empty_class_is_named(tmp_path):
    save(tmp_path / "a" / "1.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="class folder .*empty holds no images"):
        load_image_folder(tmp_path)


def test_non_image_file_is_named(tmp_path):
    save(tmp_path / "a" / "1.png")
    (tmp_path / "a" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes.txt is not an image .*remove it"):
        load_image_folder(tmp_path)


def test_undecodable_png_is_named(tmp_path):
    save(tmp_path / "a" / "1.png")
    (tmp_path / "a" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="2.png is not an image"):
        load_image_folder(tmp_path)


def test_missing_or_classless_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="has no class folders"):
        load_image_folder(tmp_path)


def make_dataset(root, classes=6, per_class=4):
    rng = np.random.default_rng(0)
    for part in ("train", "val", "test"):
        for c in range(classes):
            for i in range(per_class):
                save(
                    root / part / f"{part}{c}" / f"{i}.png",
                    (20, 20),
                    "L",
                    int(rng.integers(0, 255)),
                )


def train_protonet_on_folder(tmp_path, shots, *extra):
    """`fewshot train` of a 3-way ProtoNet on the folder dataset in tmp_path/data."""
    args = [
        "train",
        "--algorithm",
        "protonet",
        "--dataset",
        "folder",
        "--data-root",
        tmp_path / "data",
        "--ways",
        3,
        "--train-ways",
        3,
        "--shots",
        shots,
        "--queries",
        2,
        "--train-queries",
        2,
        "--out",
        tmp_path / "run",
        *extra,
    ]
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_training_from_a_folder_end_to_end(tmp_path):
    make_dataset(tmp_path / "data")
    result = train_protonet_on_folder(
        tmp_path,
        1,
        "--iterations",
        4,
        "--val-every",
        2,
        "--val-episodes",
        5,
        "--test-episodes",
        5,
        "--image-size",
        16,
    )
    assert result.exit_code == 0, result.output
    assert "meta-test accuracy" in result.output


def test_class_smaller_than_shots_plus_queries_is_one_line(tmp_path):
    make_dataset(tmp_path / "data", per_class=3)
    result = train_protonet_on_folder(tmp_path, 2)
    assert result.exit_code == 2
    assert "--shots + --train-queries = 4 is more than the 3 examples" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "run").exists()


def test_channels_come_from_the_images_unless_given(tmp_path):
    import numpy as np
    from PIL import Image

    from fewshot.datasets.image_folder import load_image_folder

    gray = np.full((20, 20), 90, np.uint8)
    for c in ("a", "b"):
        (tmp_path / "gray" / c).mkdir(parents=True)
        Image.fromarray(gray).save(tmp_path / "gray" / c / "1.png")
        Image.fromarray(gray).convert("RGB").save(tmp_path / "gray" / c / "2.png")  # R = G = B
    colour = np.zeros((20, 20, 3), np.uint8)
    colour[..., 0] = 200
    (tmp_path / "colour" / "a").mkdir(parents=True)
    Image.fromarray(gray).save(tmp_path / "colour" / "a" / "1.png")
    Image.fromarray(colour).save(tmp_path / "colour" / "a" / "2.png")

    assert load_image_folder(tmp_path / "gray", 16, None)[0].shape == (4, 1, 16, 16)
    assert load_image_folder(tmp_path / "colour", 16, None)[0].shape == (2, 3, 16, 16)
    assert load_image_folder(tmp_path / "colour", 16, 1)[0].shape == (2, 1, 16, 16)
