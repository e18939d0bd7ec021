"""Generated Omniglot archives in the real layout: every character of the real background and evaluation
sets (the characters the shipped Vinyals split lists name), a few tiny drawings each."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from PIL import Image

from metalearn.data.omniglot import ARCHIVES as ARCHIVE_NAMES

# The 30 alphabets of images_background.zip; every other alphabet of the Vinyals lists is an evaluation one.
BACKGROUND_ALPHABETS = (
    "Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc", "Arcadian", "Armenian", "Asomtavruli_(Georgian)", "Balinese",
    "Bengali", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Braille", "Burmese_(Myanmar)", "Cyrillic",
    "Early_Aramaic", "Futurama", "Grantha", "Greek", "Gujarati", "Hebrew", "Inuktitut_(Canadian_Aboriginal_Syllabics)",
    "Japanese_(hiragana)", "Japanese_(katakana)", "Korean", "Latin", "Malay_(Jawi_-_Arabic)", "Mkhedruli_(Georgian)",
    "N_Ko", "Ojibwe_(Canadian_Aboriginal_Syllabics)", "Sanskrit", "Syriac_(Estrangelo)", "Tagalog", "Tifinagh",
)
# The alphabets of images_background_small1.zip and images_background_small2.zip (all of their characters).
SMALL_ALPHABETS = {
    "small1": ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"),
    "small2": ("Greek", "Japanese_(katakana)", "Latin", "Sanskrit", "Tagalog"),
}
ARCHIVES = ("background", "evaluation", "small1", "small2")


def all_characters() -> list[str]:
    """Every `Alphabet/characterNN` of Omniglot (1,623), sorted, read from the shipped Vinyals split lists."""
    names: set[str] = set()
    for split in ("train", "val", "test"):
        text = resources.files("metalearn.data").joinpath("splits", "omniglot_vinyals", f"{split}.txt").read_text()
        names |= {line.strip().rsplit("/rot", 1)[0] for line in text.splitlines() if line.strip()}
    return sorted(names)


def archive_characters(archive: str) -> list[str]:
    """The characters of one archive (background, evaluation, small1 or small2), sorted."""
    alphabets = {"background": BACKGROUND_ALPHABETS, **SMALL_ALPHABETS}.get(archive)
    if alphabets is None:
        return [c for c in all_characters() if c.split("/")[0] not in BACKGROUND_ALPHABETS]
    return [c for c in all_characters() if c.split("/")[0] in alphabets]


def drawing_value(character: int, drawing: int, variant: int = 0) -> int:
    """The gray level of pixel (0, 0) of a drawing: distinct per drawing within a character."""
    return (character * 7 + drawing * 31 + variant * 101) % 256


def png(character: int, drawing: int, size: int, variant: int = 0) -> bytes:
    """A size x size grayscale PNG; stored uncompressed, so its length does not depend on the pixels."""
    image = Image.new("L", (size, size), 128)
    image.putpixel((0, 0), drawing_value(character, drawing, variant))
    image.putpixel((1, 0), character % 256)
    image.putpixel((2, 0), character // 256)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


def make_fake_omniglot(root: Path, archives: Sequence[str] = ARCHIVES, drawings: int = 2, size: int = 6,
                       variant: int = 0) -> Path:
    """Write `images_<archive>.zip` files into `root` and return `root`.

    Each character has `drawings` drawings `<NNNN>_<dd>.png` of size x size pixels (`png`), inside a top
    folder named like the zip, as in the official archives. Entries are stored with a fixed timestamp, so
    two `variant`s of an archive have the same length and differ only in their pixels.
    """
    root.mkdir(parents=True, exist_ok=True)
    index = {name: i for i, name in enumerate(all_characters())}
    for archive in archives:
        top = ARCHIVE_NAMES[archive]
        with zipfile.ZipFile(root / f"{top}.zip", "w", zipfile.ZIP_STORED) as z:
            for character in archive_characters(archive):
                for d in range(drawings):
                    entry = zipfile.ZipInfo(f"{top}/{character}/{index[character]:04d}_{d + 1:02d}.png",
                                            date_time=(2020, 1, 1, 0, 0, 0))
                    z.writestr(entry, png(index[character], d, size, variant))
    return root
