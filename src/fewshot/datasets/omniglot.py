"""Omniglot (Lake et al., 2015) read from its official zips, preprocessed once into a cache.

Splits, all deterministic (characters sorted by path, then shuffled with `random.Random(0)`):

- ``vinyals``: 1200 characters for meta-training (the first 1100 train, the next 100 validate)
  and the remaining 423 for meta-testing, drawn from both zips; every character rotated by
  0, 90, 180 and 270 degrees counts as four classes (Vinyals et al. 2016; Finn et al. 2017).
- ``lake``: the 30 background alphabets for meta-training (100 of their 964 characters held out
  for validation) and the 20 evaluation alphabets (659 characters) for meta-testing; no rotations.
"""

from __future__ import annotations

import io
import json
import os
import random
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fewshot.datasets.download import download_verified, md5_of_file
from fewshot.datasets.images import UNREADABLE, decode_resized
from fewshot.datasets.preprocessing import Preprocessing
from fewshot.datasets.registry import BACKBONE_SETTINGS, Dataset, register
from fewshot.errors import ConfigError, DataError
from fewshot.files import atomic_write, atomic_write_text
from fewshot.progress import progress_bar

ARCHIVES = ("images_background", "images_evaluation")
OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{archive}.zip"
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
SPLITS = ("vinyals", "lake")
PARTS = ("train", "val", "test")
IMAGE_SIZE = 28
CACHE_VERSION = 1


@dataclass(frozen=True)
class Characters:
    """All drawings of a set of characters: images (n, size, size) uint8 with strokes at 255."""

    images: torch.Tensor
    character: torch.Tensor  # index into `names` for every image
    names: list[str]  # "images_background/Alphabet/characterNN"


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The data folder: `data_root`, else $FEWSHOT_DATA_ROOT, else a per-user data folder."""
    if data_root is not None:
        return Path(data_root).expanduser()
    if os.environ.get("FEWSHOT_DATA_ROOT"):
        return Path(os.environ["FEWSHOT_DATA_ROOT"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "fewshot"


def cache_dir() -> Path:
    """Where preprocessed arrays go: $FEWSHOT_CACHE_DIR, else a per-user cache folder.

    Kept apart from the data folder, which may be read-only (a shared copy of the zips).
    """
    if os.environ.get("FEWSHOT_CACHE_DIR"):
        return Path(os.environ["FEWSHOT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewshot"


def load_omniglot(data_root: str | os.PathLike | None = None, download: bool = False) -> Characters:
    """Every Omniglot character, 28x28, from the two zips in the data folder (cached after once)."""
    root = resolve_data_root(data_root)
    archives = [_find_or_download(root, name, download) for name in ARCHIVES]
    key = "-".join(md5_of_file(path)[:12] for path in archives)
    cached = cache_dir() / f"omniglot-v{CACHE_VERSION}-{IMAGE_SIZE}px-{key}.safetensors"
    if cached.exists():
        try:
            return _read_cache(cached)
        except Exception:  # a damaged cache is rebuilt, never trusted
            cached.unlink(missing_ok=True)
    characters = _decode_archives(archives)
    try:
        _write_cache(cached, characters)
    except OSError as error:  # a read-only cache folder costs start-up time, nothing else
        warnings.warn(
            f"could not cache Omniglot in {cached.parent} ({error}); set "
            "FEWSHOT_CACHE_DIR to a writable folder to start faster.",
            stacklevel=2,
        )
    return characters


def omniglot_split(
    characters: Characters,
    split: str = "vinyals",
    part: str = "train",
    rotations: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 1, 28, 28) uint8 and class labels of one part of a split.

    `rotations=None` follows the split's convention (on for vinyals, off for lake).
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown Omniglot split {split!r}; choose one of {', '.join(SPLITS)}.")
    if part not in PARTS:
        raise ConfigError(f"unknown split part {part!r}; choose one of {', '.join(PARTS)}.")
    chosen = _split_characters(characters.names, split)[part]
    if rotations is None:
        rotations = split == "vinyals"
    keep = torch.isin(characters.character, torch.tensor(chosen, dtype=torch.long))
    images, labels = characters.images[keep], characters.character[keep]
    if rotations:
        images = torch.cat([torch.rot90(images, k, dims=(1, 2)) for k in range(4)])
        labels = torch.cat([labels * 4 + k for k in range(4)])
    return images.unsqueeze(1).contiguous(), labels


def alphabet_groups(characters: Characters, labels: torch.Tensor, split: str) -> torch.Tensor:
    """The alphabet of each class of an `omniglot_split` part's `labels`, in sorted class
    order, as group indices (Meta-Dataset draws all classes of an episode from one alphabet).
    A rotated character (vinyals) stays in its character's alphabet."""
    classes = torch.unique(labels)
    characters_of = classes // 4 if split == "vinyals" else classes
    alphabets = [characters.names[i].split("/")[1] for i in characters_of.tolist()]
    names = sorted(set(alphabets))
    return torch.tensor([names.index(a) for a in alphabets])


def _split_characters(names: list[str], split: str) -> dict[str, list[int]]:
    order = sorted(range(len(names)), key=names.__getitem__)
    if split == "vinyals":
        random.Random(0).shuffle(order)
        return {"train": order[:1100], "val": order[1100:1200], "test": order[1200:]}
    background = [i for i in order if names[i].startswith("images_background/")]
    evaluation = [i for i in order if names[i].startswith("images_evaluation/")]
    random.Random(0).shuffle(background)
    return {"train": background[100:], "val": background[:100], "test": evaluation}


def _find_or_download(root: Path, archive: str, download: bool) -> Path:
    path = root / f"{archive}.zip"
    if path.is_file():
        return path
    if not download:
        raise missing_archive(root, archive)
    return download_verified(OFFICIAL_URL.format(archive=archive), path, OFFICIAL_MD5[archive])


def missing_archive(root: Path, archive: str) -> DataError:
    """The error for a zip not in `root`."""
    return DataError(
        f"Omniglot's {archive}.zip is not in {root}. Pass `download=True` to fetch it from the "
        "official address, or point `data_root` (or $FEWSHOT_DATA_ROOT) at a folder holding "
        "images_background.zip and images_evaluation.zip."
    )


def _decode_archives(archives: list[Path]) -> Characters:
    images: list[np.ndarray] = []
    character: list[int] = []  # each drawing's character, an index into `names`
    names: list[str] = []
    for archive in archives:
        try:
            with zipfile.ZipFile(archive) as zf:
                entries = sorted(n for n in _checked_entries(zf, archive) if n.endswith(".png"))
                if not entries:
                    raise DataError(f"{archive} holds no PNG drawings; is it an Omniglot zip?")
                for entry in progress_bar(entries, desc=f"decoding {archive.name}", leave=False):
                    name = entry.rsplit("/", 1)[0]
                    if not names or names[-1] != name:
                        names.append(name)
                    images.append(_decode_png(zf.read(entry), f"{archive.name}:{entry}"))
                    character.append(len(names) - 1)
        except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as error:
            raise DataError(
                f"{archive} is not a readable zip ({error}); it may be truncated. Delete it and "
                "download it again."
            ) from None
    return Characters(torch.from_numpy(np.stack(images)), torch.tensor(character), names)


def _checked_entries(zf: zipfile.ZipFile, archive: Path) -> list[str]:
    """Entry names, refusing any that could escape a folder if extracted (we never extract, but
    such entries only appear in tampered archives): absolute paths, '..' parts, links."""
    names = []
    for info in zf.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        is_link = stat.S_ISLNK(info.external_attr >> 16)
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] or is_link:
            raise DataError(
                f"{archive} has an unsafe entry {name!r} (absolute path, '..' or link); the "
                "archive has been tampered with. Delete it and download it again."
            )
        names.append(name)
    return names


def _decode_png(data: bytes, where: str) -> np.ndarray:
    try:
        gray = decode_resized(io.BytesIO(data), IMAGE_SIZE, "L")
    except UNREADABLE as error:
        raise DataError(f"cannot decode {where}: {error}. The archive is damaged.") from None
    return 255 - gray  # strokes bright on a dark background


def _read_cache(path: Path) -> Characters:
    tensors = load_file(path)
    with open(path.with_suffix(".json"), encoding="utf-8") as f:
        names = json.load(f)["names"]
    return Characters(tensors["images"], tensors["character"], names)


def _write_cache(path: Path, characters: Characters) -> None:
    names = json.dumps({"names": characters.names})
    tensors = {"images": characters.images, "character": characters.character}
    atomic_write_text(path.with_suffix(".json"), names)
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_parts(config, data_root: Path | None, download: bool, parts: tuple[str, ...]):
    """(images, labels, groups) of each part of the run's split; groups: the alphabets for
    `--sampler meta-dataset`, else None."""
    characters = load_omniglot(data_root, download=download)
    split = [omniglot_split(characters, config.split, part) for part in parts]
    if config.sampler != "meta-dataset":
        return [(x, y, None) for x, y in split]
    return [(x, y, alphabet_groups(characters, y, config.split)) for x, y in split]


SOURCE = "Omniglot's black-on-white drawings, inverted so that strokes are bright"

register(
    Dataset(
        "omniglot",
        task="classification",
        inputs="images",
        network="backbone",
        defaults_from=("omniglot",),
        settings=("split", *BACKBONE_SETTINGS, "sampler"),
        values={
            "split": "vinyals",
            "image_size": IMAGE_SIZE,
            "channels": 1,
            "backbone": "conv4",
            "sampler": "fixed",
        },  # fmt: skip
        load=load_parts,
        default_root=resolve_data_root,
        source=SOURCE,
        measures_background=True,
        before_records=Preprocessing(IMAGE_SIZE, 1, "dark", SOURCE),
    )
)
