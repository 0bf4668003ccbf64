"""Decoding one image to a fixed size and mode; shared by Omniglot and image folders."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

# What Pillow raises for a file that is not a readable image; callers turn it into a DataError
# that names the file.
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def decode_resized(source, size: int, mode: str) -> np.ndarray:
    """Pixels of an image file (path or binary file object), converted to `mode` ("L", "RGB")
    and resized to size x size with Lanczos filtering, as uint8."""
    with Image.open(source) as image:
        resized = image.convert(mode).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)
