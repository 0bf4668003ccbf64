"""Decoded images kept on disk in one memory-mapped uint8 file, decoded once and reused.

The large benchmarks do not fit in memory beside training (tieredImageNet: 779,165 images,
16.5 GB at 84x84). Their JPEGs are decoded once into a cache file in `cache_dir()`
($FEWSHOT_CACHE_DIR, else ~/.cache/fewshot); later runs map that file, so an episode reads only
its own images' pages, and the operating system may drop them again when memory runs short.

A cache file is named after what it holds: the dataset and part, the image size, and a digest
of every source file's path, class, size and modification time (a changed image makes a new
cache). Its layout: `MAGIC`, the header's length (8 bytes, little-endian), the header (JSON:
key and shape), zeros up to a multiple of `ALIGN` bytes, then the pixels (n, 3, size, size) in C
order. It is written under a temporary name and renamed into place (`files.atomic_write`), so it
is complete or absent: an interrupted decode leaves no cache behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fewshot.datasets.images import UNREADABLE, decode_resized
from fewshot.datasets.omniglot import cache_dir
from fewshot.errors import DataError
from fewshot.files import atomic_write
from fewshot.progress import progress_bar

MAGIC = b"fewshot-u8cache\n"
ALIGN = 4096
CACHE_VERSION = 1
DECODE_BATCH = 256  # images decoded (in threads: Pillow releases the GIL) before each write
DECODE_THREADS = 4


def decoded_classes(
    name: str, root: Path, classes: Sequence[Sequence[Path]], image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images (n, 3, size, size) uint8, memory-mapped from the cache, and their labels
    (the index of their class in `classes`, a list of each class's image files); the images
    are decoded into the cache first if it does not hold them yet."""
    files = [path for found in classes for path in found]
    if not files:
        raise DataError(f"{root} holds no images of {name}'s classes; is the dataset complete?")
    labels = torch.arange(len(classes)).repeat_interleave(
        torch.tensor([len(found) for found in classes], dtype=torch.long)
    )
    key = cache_key(name, root, files, labels.tolist(), image_size)
    return cached_images(key, files, image_size, f"decoding {name}"), labels


def cache_key(
    name: str, root: Path, files: Sequence[Path], labels: Sequence[int], image_size: int
) -> str:
    """The cache file's name for these files (their paths below `root`, classes, sizes and
    modification times) decoded at `image_size`."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {image_size}\n".encode())
    for path, label in zip(files, labels):
        try:
            stat = path.stat()
        except OSError as error:
            raise DataError(
                f"cannot read {path} ({error.strerror}); is the dataset complete?"
            ) from None
        line = f"{path.relative_to(root).as_posix()}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}"
        digest.update(line.encode() + b"\n")
    return f"{name}-{image_size}px-{digest.hexdigest()[:16]}"


def cached_images(key: str, files: Sequence[Path], image_size: int, desc: str) -> torch.Tensor:
    """The images of `files` from the cache file `key`, decoded into it first if absent."""
    path = cache_dir() / f"{key}.u8"
    shape = (len(files), 3, image_size, image_size)
    images = read_cache(path, key, shape)
    if images is None:
        write_cache(path, key, shape, lambda pixels: decode_into(pixels, files, desc))
        images = read_cache(path, key, shape)
    if images is None:  # written, but not readable back: the cache folder is unreliable
        raise DataError(f"the image cache {path} could not be read back after writing it.")
    return images


def read_cache(path: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached pixels, memory-mapped (copy-on-write: the file is never changed), or None
    if there is no such cache; a damaged one is deleted, to be rebuilt."""
    if not path.is_file():
        return None
    try:
        offset = _check_header(path, key, shape)
        mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=shape)
    except (OSError, ValueError, KeyError, TypeError):  # truncated, or not what it should be
        with contextlib.suppress(OSError):  # a read-only folder: writing anew will say so
            path.unlink()
        return None
    if hasattr(mmap, "MADV_RANDOM"):  # episodes read scattered images: no read-ahead
        # numpy's stubs leave out the memmap's private mmap object, which has madvise
        mapped._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
    return torch.from_numpy(mapped)


def write_cache(path: Path, key: str, shape: tuple[int, ...], fill) -> None:
    """Write a cache file of `shape` pixels: `fill(pixels)` fills a writable memory map of the
    temporary file, which is renamed into place only once complete."""
    header = _header(key, shape)
    size = len(header) + int(np.prod(shape))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            f.truncate(size)
        pixels = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=len(header), shape=shape)
        fill(pixels)
        pixels.flush()
        del pixels

    try:
        _check_room(path.parent, size)
        atomic_write(path, write)
    except OSError as error:
        raise DataError(
            f"could not write the image cache {path} ({error.strerror or error}); set "
            "FEWSHOT_CACHE_DIR to a writable folder with room for it."
        ) from None


def decode_into(pixels: np.ndarray, files: Sequence[Path], desc: str) -> None:
    """Decode each file to RGB at the size of `pixels` (n, 3, size, size), in order."""
    decode = partial(decode_rgb, size=pixels.shape[-1])
    bar = progress_bar(total=len(files), desc=desc, unit="img", leave=False)
    with ThreadPoolExecutor(DECODE_THREADS) as pool, bar:
        for start in range(0, len(files), DECODE_BATCH):
            batch = files[start : start + DECODE_BATCH]
            for i, image in enumerate(pool.map(decode, batch), start):
                pixels[i] = image
            bar.update(len(batch))


def decode_rgb(path: Path, size: int) -> np.ndarray:
    """One image file as (3, size, size) uint8 RGB (`images.decode_resized`)."""
    try:
        return decode_resized(path, size, "RGB").transpose(2, 0, 1)
    except UNREADABLE as error:
        raise DataError(
            f"{path} is not an image that can be read ({type(error).__name__}); replace it "
            "with the dataset's original file."
        ) from None


def _header(key: str, shape: tuple[int, ...]) -> bytes:
    text = json.dumps({"key": key, "shape": list(shape), "dtype": "uint8"}).encode()
    start = MAGIC + len(text).to_bytes(8, "little") + text
    return start + b"\0" * (-len(start) % ALIGN)


def _check_header(path: Path, key: str, shape: tuple[int, ...]) -> int:
    """The pixels' offset in a cache file whose header matches, else ValueError."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a fewshot image cache")
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    offset = len(_header(key, shape))
    if header["key"] != key or header["shape"] != list(shape):
        raise ValueError("a cache of other images")
    if path.stat().st_size != offset + int(np.prod(shape)):
        raise ValueError("truncated")
    return offset


def _check_room(folder: Path, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < size:
        raise DataError(
            f"the decoded images need {size / 1e9:.1f} GB in {folder}, which has "
            f"{free / 1e9:.1f} GB free; set FEWSHOT_CACHE_DIR to a folder with room."
        )
