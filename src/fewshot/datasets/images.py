"""Decoding one image to a fixed size and mode; shared by Omniglot, image folders and the
images a user brings to a trained model (`preprocessing`), so that all are read alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# What Pillow raises for a file that is not a readable image; callers turn it into a DataError
# that names the file.
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def open_flat(source) -> Image.Image:
    """An image file (path or binary file object), loaded, its transparent pixels made white
    (as image viewers show them)."""
    with Image.open(source) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        ):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("L" if image.mode == "LA" else "RGB")
        return image.copy()


def resized(image: Image.Image, size: int, mode: str) -> np.ndarray:
    """Pixels converted to `mode` ("L", "RGB") and resized to size x size with Lanczos
    filtering, as uint8."""
    converted = image.convert(mode).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(converted, dtype=np.uint8)


def decode_resized(source, size: int, mode: str) -> np.ndarray:
    """`resized` pixels of an image file."""
    return resized(open_flat(source), size, mode)


def channels_of(image: Image.Image) -> int:
    """1 for an image whose pixels are gray (in any mode, RGB with equal bands included), else 3."""
    if len(image.getbands()) == 1 and image.mode != "P":
        return 1
    rgb = np.asarray(image.convert("RGB"))
    same = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return 1 if same else 3


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The files of a folder (and of its subfolders, if `recursive`), sorted, hidden ones
    skipped."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
