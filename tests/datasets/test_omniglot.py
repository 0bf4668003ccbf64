"""Omniglot from the official zips: contents, splits, download and damaged input."""

import hashlib
import http.server
import io
import shutil
import threading
import zipfile
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.cli import in_flags
from fewshot.datasets import omniglot as og
from fewshot.errors import DataError

pytestmark = pytest.mark.omniglot


def test_all_characters_are_read_at_28_pixels(omniglot):
    assert len(omniglot.names) == 1623
    assert omniglot.images.shape == (32460, 28, 28) and omniglot.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(omniglot.character), torch.full((1623,), 20))
    # Strokes are bright on a dark background, and occupy a small part of each drawing.
    assert omniglot.images.float().mean() < 60
    assert sum(n.startswith("images_background/") for n in omniglot.names) == 964


@pytest.mark.parametrize("split, sizes", [("vinyals", (1100, 100, 423)), ("lake", (864, 100, 659))])
def test_splits_partition_the_characters(omniglot, split, sizes):
    parts = {p: og._split_characters(omniglot.names, split)[p] for p in og.PARTS}
    assert tuple(len(parts[p]) for p in og.PARTS) == sizes
    assert not set(parts["train"]) & set(parts["val"]) | set(parts["train"]) & set(parts["test"])
    assert not set(parts["val"]) & set(parts["test"])
    if split == "lake":
        assert all(omniglot.names[i].startswith("images_evaluation/") for i in parts["test"])
        assert all(omniglot.names[i].startswith("images_background/") for i in parts["train"])


def test_vinyals_rotations_make_four_classes_per_character(omniglot):
    images, labels = og.omniglot_split(omniglot, "vinyals", "test")
    assert labels.unique().numel() == 4 * 423 and images.shape == (4 * 423 * 20, 1, 28, 28)
    plain, plain_labels = og.omniglot_split(omniglot, "vinyals", "test", rotations=False)
    first = plain_labels[0]
    rotated = images[labels == first * 4 + 1]
    torch.testing.assert_close(rotated, torch.rot90(plain[plain_labels == first], 1, (2, 3)))


def test_split_is_deterministic_and_documented_unknown_names_fail(omniglot):
    a = og._split_characters(omniglot.names, "vinyals")
    b = og._split_characters(list(omniglot.names), "vinyals")
    assert a == b
    with pytest.raises(Exception, match="unknown Omniglot split 'nope'"):
        og.omniglot_split(omniglot, "nope", "train")


def test_second_load_comes_from_the_cache(omniglot_root):
    cached = og.load_omniglot(omniglot_root)
    assert list(og.cache_dir().glob("omniglot-v1-28px-*.safetensors"))
    assert torch.equal(cached.images[:100], og.load_omniglot(omniglot_root).images[:100])


def test_missing_folder_says_how_to_get_omniglot_in_each_interface_s_words(tmp_path):
    with pytest.raises(DataError, match="Pass `download=True` .* or point `data_root`") as refused:
        og.load_omniglot(tmp_path / "nowhere")
    python, command_line = str(refused.value), in_flags(str(refused.value))
    assert "--" not in python  # no command-line option in the Python API's message
    assert "Pass --download to" in command_line and "point --data-root (or" in command_line
    assert "download=True" not in command_line and "data_root" not in command_line


def test_truncated_zip_is_refused_in_one_line(tmp_path, omniglot_root, monkeypatch):
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    blob = (omniglot_root / "images_background.zip").read_bytes()
    (data / "images_background.zip").write_bytes(blob[: len(blob) // 2])
    shutil.copy(omniglot_root / "images_evaluation.zip", data)
    with pytest.raises(DataError, match="not a readable zip.*truncated"):
        og.load_omniglot(data)
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((105, 105)) > 0.1).astype(np.uint8) * 255).convert("1")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def tiny_omniglot_zip(archive: str, characters: int = 3, drawings: int = 4, bad: bool = False):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for c in range(characters):
            for d in range(drawings):
                name = f"{archive}/Alphabet/character{c + 1:02d}/{c:04d}_{d:02d}.png"
                zf.writestr(name, b"not a png" if bad and c == d == 0 else png_bytes(c * 10 + d))
    return out.getvalue()


def test_undecodable_png_names_the_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "images_background.zip").write_bytes(
        tiny_omniglot_zip("images_background", bad=True)
    )
    (tmp_path / "images_evaluation.zip").write_bytes(tiny_omniglot_zip("images_evaluation"))
    with pytest.raises(DataError, match="cannot decode images_background.zip:.*0000_00.png"):
        og.load_omniglot(tmp_path)


@pytest.fixture
def loopback_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving files from a folder."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_checksums_then_loads(tmp_path, loopback_server, monkeypatch):
    served, base = loopback_server
    checksums = {}
    for archive in og.ARCHIVES:
        blob = tiny_omniglot_zip(archive)
        (served / f"{archive}.zip").write_bytes(blob)
        checksums[archive] = hashlib.md5(blob).hexdigest()
    monkeypatch.setattr(og, "OFFICIAL_URL", base + "/{archive}.zip")
    monkeypatch.setattr(og, "OFFICIAL_MD5", checksums)
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    characters = og.load_omniglot(data, download=True)
    assert len(characters.names) == 6 and characters.images.shape == (24, 28, 28)
    assert sorted(p.name for p in data.iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]


def test_tampered_download_is_deleted_and_reported(tmp_path, loopback_server, monkeypatch):
    served, base = loopback_server
    for archive in og.ARCHIVES:
        (served / f"{archive}.zip").write_bytes(tiny_omniglot_zip(archive))
    monkeypatch.setattr(og, "OFFICIAL_URL", base + "/{archive}.zip")
    monkeypatch.setattr(og, "OFFICIAL_MD5", {a: "0" * 32 for a in og.ARCHIVES})
    data = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch .* the file was deleted"):
        og.load_omniglot(data, download=True)
    assert list(data.iterdir()) == []


def test_unreachable_server_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(og, "OFFICIAL_URL", "http://127.0.0.1:9/{archive}.zip")
    with pytest.raises(DataError, match="could not download .*Check the network"):
        og.load_omniglot(tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("entry", ["../escape.png", "/etc/evil.png", "a/../../b.png", "link"])
def test_hostile_zip_entries_are_refused(tmp_path, monkeypatch, entry):
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "cache"))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("images_background/A/character01/0000_00.png", png_bytes(0))
        info = zipfile.ZipInfo(entry)
        if entry == "link":
            info.external_attr = 0o120777 << 16  # a symbolic link to /etc/passwd
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(info, png_bytes(1))
    (tmp_path / "images_background.zip").write_bytes(out.getvalue())
    (tmp_path / "images_evaluation.zip").write_bytes(tiny_omniglot_zip("images_evaluation"))
    with pytest.raises(DataError, match="unsafe entry .*tampered with"):
        og.load_omniglot(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]
