"""miniImageNet (Ravi & Larochelle's CSV files) and tieredImageNet (class folders) read from
tiny fixtures in their published layouts; the memory-mapped cache they are decoded into."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fewshot import TaskSampler
from fewshot.cli import main
from fewshot.datasets import image_cache
from fewshot.datasets.imagenet import load_mini_imagenet, load_tiered_imagenet
from fewshot.datasets.transforms import pixel_statistics
from fewshot.errors import DataError

# Real synsets of each part of Ravi & Larochelle's split.
MINI = {
    "train": ["n01532829", "n01558993", "n01704323"],
    "val": ["n01855672", "n02091244"],
    "test": ["n01930112", "n01981276"],
}
SIZE = 16  # written at the size read, so decoding involves no resizing


def colour(wnid: str, i: int) -> tuple[int, int, int]:
    seed = int(wnid[1:]) + i
    return (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)


def write_jpeg(path, rgb, size=SIZE):
    """A JPEG of one colour with a darker top-left quarter (so orientation is checked)."""
    pixels = np.full((size, size, 3), rgb, dtype=np.uint8)
    pixels[: size // 2, : size // 2] //= 2
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95, subsampling=0)  # 4:4:4: no colour bleed


def write_mini(root, per_class=3):
    """images/ and the three CSV files; rows of a part's classes interleaved, as a shuffled
    file would have them."""
    for part, wnids in MINI.items():
        rows = ["filename,label"]
        for i in range(per_class):
            for wnid in wnids:
                name = f"{wnid}{i:08d}.jpg"
                write_jpeg(root / "images" / name, colour(wnid, i))
                rows.append(f"{name},{wnid}")
        (root / f"{part}.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def decoded_by_pillow(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).copy())


@pytest.mark.parametrize("part", ["train", "val", "test"])
def test_mini_imagenet_parts_hold_their_csv_images(tmp_path, part):
    write_mini(tmp_path / "mini")
    images, labels = load_mini_imagenet(tmp_path / "mini", part, image_size=SIZE)
    wnids = sorted(MINI[part])
    assert images.shape == (3 * len(wnids), 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert labels.tolist() == [c for c in range(len(wnids)) for _ in range(3)]
    for image, (wnid, i) in zip(images, [(w, i) for w in wnids for i in range(3)]):
        path = tmp_path / "mini" / "images" / f"{wnid}{i:08d}.jpg"
        assert torch.equal(image, decoded_by_pillow(path))
        lower_right = image[:, -1, -1].tolist()
        assert all(abs(a - b) <= 3 for a, b in zip(lower_right, colour(wnid, i)))
        assert all(abs(a - b // 2) <= 3 for a, b in zip(image[:, 0, 0].tolist(), colour(wnid, i)))


def test_mini_imagenet_resizes_to_84_by_default(tmp_path):
    write_mini(tmp_path / "mini", per_class=1)
    images, _ = load_mini_imagenet(tmp_path / "mini", "val")
    assert images.shape == (2, 3, 84, 84)
    assert all(
        abs(a - b) <= 3 for a, b in zip(images[0, :, 60, 60].tolist(), colour(MINI["val"][0], 0))
    )


def test_mini_imagenet_bad_layouts_are_one_line(tmp_path):
    root = tmp_path / "mini"
    write_mini(root, per_class=1)
    (root / "images" / f"{MINI['test'][1]}00000000.jpg").unlink()
    with pytest.raises(
        DataError, match="n0198127600000000.jpg is listed in .*test.csv but missing"
    ):
        load_mini_imagenet(root, "test")
    with open(root / "val.csv", "a") as f:
        f.write(f"x.jpg,{MINI['train'][0]}\n")
    with pytest.raises(DataError, match="n01532829 is in both the train and the val part"):
        load_mini_imagenet(root, "train")
    (root / "val.csv").write_text("image,class\nx.jpg,n1\n")
    with pytest.raises(DataError, match="val.csv does not start with the header 'filename,label'"):
        load_mini_imagenet(root, "train")
    (root / "val.csv").write_text("filename,label\n../secret.jpg,n1\n")
    with pytest.raises(DataError, match="line 2: '../secret.jpg' is not a file name in images/"):
        load_mini_imagenet(root, "train")
    (root / "val.csv").unlink()
    with pytest.raises(DataError, match="miniImageNet's val.csv is not in"):
        load_mini_imagenet(root, "train")


def write_tiered(root, classes=None, per_class=2):
    classes = classes or {
        "train": ["n01440764", "n01443537"],
        "val": ["n02085620"],
        "test": ["n02087046", "n02088094"],
    }
    for part, wnids in classes.items():
        for wnid in wnids:
            for i in range(per_class):
                write_jpeg(root / part / wnid / f"{wnid}_{i}.JPEG", colour(wnid, i))


def test_tiered_imagenet_reads_class_folders(tmp_path):
    write_tiered(tmp_path / "tiered")
    images, labels = load_tiered_imagenet(tmp_path / "tiered", "test", image_size=SIZE)
    assert labels.tolist() == [0, 0, 1, 1]
    for image, (wnid, i) in zip(
        images, [("n02087046", 0), ("n02087046", 1), ("n02088094", 0), ("n02088094", 1)]
    ):
        assert torch.equal(
            image, decoded_by_pillow(tmp_path / "tiered" / "test" / wnid / f"{wnid}_{i}.JPEG")
        )


def test_tiered_imagenet_bad_layouts_are_one_line(tmp_path):
    root = tmp_path / "tiered"
    write_tiered(root, {"train": ["n01440764"], "val": ["n01440764"], "test": ["n02087046"]})
    with pytest.raises(DataError, match="n01440764 is in both the train and the val part"):
        load_tiered_imagenet(root, "train")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "train_images_png.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(DataError, match="pickled tieredImageNet, which fewshot does not unpickle"):
        load_tiered_imagenet(pickled, "train")
    with pytest.raises(DataError, match="tieredImageNet's train/ folder is not in"):
        load_tiered_imagenet(tmp_path / "nothing", "train")


def cache_files(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_cache_is_reused_and_equals_a_fresh_decode(tmp_path, cache, monkeypatch):
    write_mini(tmp_path / "mini")
    first, labels = load_mini_imagenet(tmp_path / "mini", "train", image_size=SIZE)
    (written,) = cache_files(cache)
    assert written.startswith("mini-imagenet-train-16px-") and written.endswith(".u8")
    stamp = (cache / written).stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    with monkeypatch.context() as patch:
        patch.setattr(image_cache, "decode_rgb", no_decoding)
        again, again_labels = load_mini_imagenet(tmp_path / "mini", "train", image_size=SIZE)
    assert torch.equal(again, first) and torch.equal(again_labels, labels)
    assert (cache / written).stat().st_mtime_ns == stamp
    (cache / written).unlink()
    fresh, _ = load_mini_imagenet(tmp_path / "mini", "train", image_size=SIZE)
    assert torch.equal(fresh, first)


def test_interrupted_cache_write_leaves_no_cache(tmp_path, cache, monkeypatch):
    write_mini(tmp_path / "mini")
    decode = image_cache.decode_rgb
    calls = []

    def interrupted(path, size):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return decode(path, size)

    with monkeypatch.context() as patch:
        patch.setattr(image_cache, "decode_rgb", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_mini_imagenet(tmp_path / "mini", "train", image_size=SIZE)
    assert cache_files(cache) == []  # neither a cache nor its temporary file
    images, _ = load_mini_imagenet(tmp_path / "mini", "train", image_size=SIZE)
    path = tmp_path / "mini" / "images" / f"{MINI['train'][0]}00000000.jpg"
    assert torch.equal(images[0], decoded_by_pillow(path))


def test_damaged_or_outdated_cache_is_rebuilt(tmp_path, cache):
    write_mini(tmp_path / "mini")
    first = load_mini_imagenet(tmp_path / "mini", "val", image_size=SIZE)[0].clone()
    (written,) = cache_files(cache)
    with open(cache / written, "r+b") as f:
        f.truncate(5000)
    assert torch.equal(load_mini_imagenet(tmp_path / "mini", "val", image_size=SIZE)[0], first)
    wnid = MINI["val"][0]
    write_jpeg(tmp_path / "mini" / "images" / f"{wnid}00000001.jpg", (250, 5, 5))
    changed, _ = load_mini_imagenet(tmp_path / "mini", "val", image_size=SIZE)
    assert abs(int(changed[1, 0, -1, -1]) - 250) <= 3 and len(cache_files(cache)) == 2


def test_sampler_reads_episodes_from_the_mapped_cache(tmp_path, cache):
    write_mini(tmp_path / "mini")
    images, labels = load_mini_imagenet(tmp_path / "mini", "train", image_size=SIZE)
    (written,) = cache_files(cache)
    if Path("/proc/self/maps").exists():  # the pixels are the file's pages, not a copy
        assert str(cache / written) in Path("/proc/self/maps").read_text()
    sampler = TaskSampler(images, labels, ways=3, shots=1, queries=2)
    assert sampler.inputs.data_ptr() == images.data_ptr()
    task = sampler.sample(2, torch.Generator().manual_seed(0))
    assert task.support_x.shape == (2, 3, 3, SIZE, SIZE)

    def class_of(x):
        pixels = (x * 255).round().to(torch.uint8)
        return {int(labels[j]) for j in range(len(images)) if torch.equal(images[j], pixels)}

    for t in range(2):
        classes = [class_of(task.support_x[t][task.support_y[t] == way][0]) for way in range(3)]
        assert sorted(c for found in classes for c in found) == [0, 1, 2]
        for query, way in zip(task.query_x[t], task.query_y[t]):
            assert class_of(query) == classes[way]


@pytest.mark.slow
def test_train_and_eval_on_mini_imagenet_from_the_command_line(tmp_path, cache):
    write_mini(tmp_path / "mini")
    args = [
        "--algorithm",
        "protonet",
        "--dataset",
        "mini-imagenet",
        "--data-root",
        tmp_path / "mini",
    ]
    episodes = ["--ways", "2", "--train-ways", "2", "--shots", "1", "--queries", "1"]
    quick = ["--iterations", "2", "--val-every", "2", "--val-episodes", "2", "--test-episodes", "4"]
    argv = ["train", *args, *episodes, "--train-queries", "1", *quick, "--out", tmp_path / "run"]
    result = CliRunner().invoke(main, [str(a) for a in [*argv, "--normalize"]])
    assert result.exit_code == 0, result.output
    assert [name.split("-84px-")[0] for name in cache_files(cache)] == [
        "mini-imagenet-test",
        "mini-imagenet-train",
        "mini-imagenet-val",
    ]
    recorded = json.loads((tmp_path / "run" / "preprocessing.json").read_text())
    assert (recorded["image_size"], recorded["channels"]) == (84, 3)
    # --normalize: the training part's own statistics, recorded for eval and adapt
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    train_images, _ = load_mini_imagenet(tmp_path / "mini", "train")
    mean, std = pixel_statistics(train_images)
    assert config["normalize"] and (config["pixel_mean"], config["pixel_std"]) == (mean, std)
    assert (recorded["mean"], recorded["std"]) == (mean, std)
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--episodes", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["episodes"] == 4
    result = CliRunner().invoke(
        main, [str(a) for a in ["train", *args[:4], "--out", tmp_path / "r2"]]
    )
    assert result.exit_code == 2
    assert "--dataset mini-imagenet needs --data-root DIR, the folder that holds" in result.output


def test_cache_folder_without_room_or_unwritable_is_one_line(tmp_path, monkeypatch):
    write_mini(tmp_path / "mini", per_class=1)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(DataError, match="could not write the image cache .* set FEWSHOT_CACHE_DIR"):
        load_mini_imagenet(tmp_path / "mini", "val")
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(
        image_cache.shutil, "disk_usage", lambda folder: type("U", (), {"free": 10})
    )
    with pytest.raises(DataError, match="need 0.0 GB in .*cache, which has 0.0 GB free"):
        load_mini_imagenet(tmp_path / "mini", "val")
    assert cache_files(tmp_path / "cache") == []
