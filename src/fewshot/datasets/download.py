"""Checksum-verified downloads that never leave a half-written or unverified file behind."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from fewshot.errors import DataError
from fewshot.files import atomic_write
from fewshot.progress import progress_bar

CHUNK_BYTES = 1 << 16


def download_verified(url: str, destination: Path, md5: str, timeout: float = 60.0) -> Path:
    """Fetch `url` to `destination`, keeping it only if its MD5 digest equals `md5`.

    The bytes go to a temporary file in the destination folder, renamed into place only after
    the digest matches, so an interrupted or tampered download never looks complete.
    """

    def fetch_and_verify(tmp: str) -> None:
        with open(tmp, "wb") as out:
            digest = _stream(url, out, timeout)
        if digest != md5:
            raise DataError(
                f"checksum mismatch for {url}: got MD5 {digest}, expected {md5}; the file was "
                "deleted. Try again later, or download it by hand into the data folder."
            )

    atomic_write(destination, fetch_and_verify)
    return destination


def md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stream(url: str, out, timeout: float) -> str:
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(
                total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], leave=False
            ) as bar:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as error:
        raise DataError(
            f"could not download {url}: {error}. Check the network and retry."
        ) from None
    return digest.hexdigest()
