"""Held-out Omniglot characters as ordinary PNG folders, the way a user would bring drawings to
`fewshot adapt`: SUPPORT/<class>/<n>.png and QUERIES/<class>-<n>.png.

The drawings come from the official zips as they are (black strokes on white, 105 x 105),
saved as 8-bit grayscale PNGs; `--white-on-black` inverts them first. The characters are the
meta-test characters of the vinyals split (never seen in training), unrotated.

    python scripts/omniglot_folders.py --data-root ../shared/data/omniglot --out /tmp/episode
    fewshot adapt zoo/protonet-omniglot-5w1s --support /tmp/episode/support \\
        --predict /tmp/episode/queries
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import click
import torch
from PIL import Image, ImageOps

from fewshot.datasets.omniglot import ARCHIVES, Characters, load_omniglot, omniglot_split


class Drawings:
    """Meta-test characters of the vinyals split: each drawing's original PNG from the official
    zip, and its image as the training pipeline cached it."""

    def __init__(self, root: Path, characters: Characters) -> None:
        self.characters = characters
        _, labels = omniglot_split(characters, "vinyals", "test", rotations=False)
        self.test = sorted(set(labels.tolist()))
        self.entries: dict[str, list[tuple[zipfile.ZipFile, str]]] = {}
        for archive in ARCHIVES:
            zf = zipfile.ZipFile(Path(root) / f"{archive}.zip")  # open for the object's life
            for entry in sorted(n for n in zf.namelist() if n.endswith(".png")):
                self.entries.setdefault(entry.rsplit("/", 1)[0], []).append((zf, entry))

    def png(self, character: int, drawing: int) -> Image.Image:
        """The drawing as an ordinary 8-bit grayscale image, black strokes on white."""
        archive, entry = self.entries[self.characters.names[character]][drawing]
        return Image.open(io.BytesIO(archive.read(entry))).convert("L")

    def cached(self, character: int, drawing: int) -> torch.Tensor:
        """The drawing as training saw it: 28 x 28 uint8, strokes bright."""
        return self.characters.images[self.characters.character == character][drawing]

    def name(self, character: int) -> str:
        """A folder name for a character: alphabet and character number."""
        return "-".join(self.characters.names[character].split("/")[1:])


def write_episode(
    drawings: Drawings,
    folder: Path,
    characters: list[int],
    shots: int,
    queries: int,
    invert: bool = False,
) -> list[tuple[int, int, str]]:
    """Write folder/support/<class>/ and folder/queries/; return each drawing's (character,
    drawing, "support" or "query")."""
    written = []
    for role, drawing_numbers in (
        ("support", range(shots)),
        ("query", range(shots, shots + queries)),
    ):
        for character in characters:
            for drawing in drawing_numbers:
                image = drawings.png(character, drawing)
                image = ImageOps.invert(image) if invert else image
                name = drawings.name(character)
                path = (
                    folder / "support" / name / f"{drawing:02d}.png"
                    if role == "support"
                    else folder / "queries" / f"{name}-{drawing:02d}.png"
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
                written.append((character, drawing, role))
    return written


@click.command()
@click.option("--data-root", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--ways", default=5, type=click.IntRange(min=2))
@click.option("--shots", default=1, type=click.IntRange(min=1))
@click.option("--queries", default=3, type=click.IntRange(min=1))
@click.option("--seed", default=0, type=int, help="Which characters.")
@click.option("--white-on-black", is_flag=True, help="Invert the drawings first.")
def main(data_root, out, ways, shots, queries, seed, white_on_black):
    drawings = Drawings(data_root, load_omniglot(data_root))
    characters = random.Random(seed).sample(drawings.test, ways)
    write_episode(drawings, out, characters, shots, queries, white_on_black)
    click.echo(f"{ways} classes, {shots} support and {queries} query drawings each, in {out}")


if __name__ == "__main__":
    main()
