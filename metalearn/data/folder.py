"""Episodes from your own images: one folder per class, or `filename,label` CSV split files.

Two layouts are read:
    folders: `root/<split>/<class>/<image>`, e.g. `root/train/cat/001.jpg`; the class is the folder name.
    CSV: `root/images/<filename>` plus `<csv_dir>/<split>.csv` with the header `filename,label`, the
        layout of the mini-ImageNet split files of Ravi & Larochelle (2017), "Optimization as a model for
        few-shot learning", ICLR.

Each image is converted to grayscale ("L") or RGB, resized to a square with Lanczos filtering (aspect
ratio is not kept, as in the standard mini-ImageNet preprocessing), and stored as uint8. Decoded splits
are cached in `cache_dir`, keyed by the files' paths, sizes and modification times.
"""

from __future__ import annotations

import csv
import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metalearn.checks import positive_int
from metalearn.data.augment import Augment
from metalearn.data.cache import cache_path, cached, file_identity
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.images import ClassImages
from metalearn.tasks import SPLITS, Split

log = logging.getLogger(__name__)

MODES = {1: "L", 3: "RGB"}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
CACHE_VERSION = 1
# What Pillow raises for a file it cannot decode ("cannot identify", "image file is truncated": OSErrors).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, zlib.error)
Rows = list[tuple[str, str]]  # (image path relative to the dataset root, class name)


def check_channels(channels: int) -> int:
    """Return `channels` if it is 1 (grayscale) or 3 (RGB), else raise ValueError naming it."""
    if isinstance(channels, bool) or channels not in MODES:
        raise ValueError(f"channels={channels!r}: must be 1 (grayscale) or 3 (RGB)")
    return channels


def to_array(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """A Pillow image as uint8 [channels, image_size, image_size], resized with Lanczos filtering if needed."""
    image = image.convert(MODES[channels])
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[np.newaxis] if channels == 1 else array.transpose(2, 0, 1)


def damage_reason(ex: BaseException) -> str:
    """`truncated or corrupt: <first line of the error>`, for one-line messages about a damaged file.

    Args:
        ex: what reading or decoding the file raised.

    Returns:
        The reason, without line breaks.
    """
    if isinstance(ex, UnidentifiedImageError):  # its message names the file (or an in-memory buffer) again
        return "truncated or corrupt: not an image file Pillow recognises"
    detail = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
    return f"truncated or corrupt: {detail}"


def _decode(file: IO[bytes], image_size: int, channels: int) -> np.ndarray:
    with Image.open(file) as image:
        # JPEGs are decoded at a reduced scale (still >= image_size) when that is possible: several
        # times faster for mini-ImageNet's ~500px photos, and Lanczos resizing follows anyway.
        image.draft(MODES[channels], (image_size, image_size))
        return to_array(image, image_size, channels)


def read_csv_rows(text: str, origin: str) -> Rows:
    """Parse a `filename,label` split CSV into (`images/<filename>`, label) rows.

    Args:
        text: the CSV's contents, starting with the header line `filename,label`.
        origin: the CSV's name, for error messages.

    Returns:
        One row per image, in file order.
    """
    lines = list(csv.reader(text.splitlines()))
    if not lines or [cell.strip() for cell in lines[0]] != ["filename", "label"]:
        raise ValueError(f"{origin}: the first line must be the header `filename,label`")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if len(line) != 2:
            if line:
                raise ValueError(f"{origin}, line {number}: expected `filename,label`, got {','.join(line)!r}")
            continue
        rows.append((f"images/{line[0].strip()}", line[1].strip()))
    return rows


def folder_rows(root: Path, split_dir: str) -> Rows:
    """(`<split_dir>/<class>/<image>`, class) rows for every image file under `root/<split_dir>`, sorted."""
    base = root / split_dir
    rows = [(path.relative_to(root).as_posix(), path.parent.name)
            for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
            for path in sorted(folder.iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")]
    if not rows:
        raise FileNotFoundError(f"root={str(root)!r}: no images in {base}/<class>/ (file types: "
                                f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return rows


def check_disjoint(rows: Mapping[str, Rows], key: str) -> None:
    """Raise a one-line ValueError naming `key` and a class that two split sources share.

    Args:
        rows: the rows of each distinct split source (a folder or CSV), keyed by its name for messages.
        key: the setting that chose the sources, as `name=value` (e.g. `csv_dir='splits'`).
    """
    seen: dict[str, str] = {}
    for origin, source_rows in rows.items():
        for label in sorted({label for _, label in source_rows}):
            if label in seen:
                raise ValueError(f"{key}: class {label!r} is in both {seen[label]} and {origin}; a class must be in "
                                 f"one split only, or validation and test would score classes seen before")
            seen[label] = origin


def _identity(root: Path, rows: Rows, origin: str) -> list[tuple[str, int, int]]:
    """The files' identity for the cache key; a clear FileNotFoundError naming a missing file."""
    files = [root / path for path, _ in rows]
    try:
        return file_identity(files)
    except FileNotFoundError:
        missing = [f for f in files if not f.is_file()]
        if not missing:
            raise
        raise FileNotFoundError(f"root={str(root)!r}: {missing[0]} is missing ({origin} names it; "
                                f"{len(missing)} of {len(files)} listed images are missing)") from None


def load_split(root: Path, rows: Rows, origin: str, *, image_size: int, channels: int,
               cache_dir: Path | None, name: str) -> ClassImages:
    """Decode the images of one split (cached) as a ClassImages with classes in sorted name order.

    Args:
        root: the dataset folder the row paths are relative to.
        rows: (image path, class name) per image.
        origin: where the rows came from (a CSV or folder), for error messages.
        image_size: side of the square images.
        channels: 1 (grayscale) or 3 (RGB).
        cache_dir: where decoded splits are cached (None: no cache).
        name: readable start of the cache file name, e.g. `miniimagenet-train`.

    Returns:
        The split's images, uint8 [N, channels, image_size, image_size].
    """
    if not rows:
        raise ValueError(f"root={str(root)!r}: {origin} lists no images")
    absolute = root.resolve()
    identity = (rows, image_size, channels, _identity(absolute, rows, origin))
    cache = cache_path(cache_dir, f"{name}-{image_size}px-{channels}ch-v{CACHE_VERSION}", identity)

    def build() -> dict[str, Any]:
        log.info("Decoding %d images of %s (once; cached in %s)", len(rows), origin, cache_dir)
        class_names = sorted({label for _, label in rows})
        index = {label: i for i, label in enumerate(class_names)}
        images = torch.empty(len(rows), channels, image_size, image_size, dtype=torch.uint8)
        pixels = images.numpy()  # filled in place: no second copy of a large split
        for i, (path, _) in enumerate(rows):
            with (absolute / path).open("rb") as f:  # outside the try: a missing or unreadable file is no damage
                try:
                    pixels[i] = _decode(f, image_size, channels)
                except IMAGE_ERRORS as ex:
                    raise ValueError(f"root={str(root)!r}: {root / path} is not a readable image "
                                     f"({damage_reason(ex)}): replace it with a good copy") from ex
        labels = torch.tensor([index[label] for _, label in rows], dtype=torch.int64)
        return {"images": images, "labels": labels, "class_names": class_names}

    saved = cached(cache, build)
    return ClassImages(saved["images"], saved["labels"], saved["class_names"])


class ImageFolder(EpisodeSampler):
    """N-way K-shot episodes over a user's own image collection.

    Args:
        root: the dataset folder, holding `<split>/<class>/<image>` folders, or `images/<filename>`
            when `csv_dir` is given.
        n_way, k_shot, k_query: episode shape at evaluation (and at training unless overridden).
        image_size: side of the square images.
        channels: 1 (grayscale) or 3 (RGB).
        cache_dir: where decoded images are cached (None: no cache).
        split_dirs: the folders (or, with `csv_dir`, the CSV file stems) of the train, val and test
            splits; name one folder twice to use it for two splits (e.g. `[train, test, test]`). Different
            folders must not share a class.
        csv_dir: folder of `<split>.csv` files (`filename,label`), relative to `root` unless absolute.
        train_n_way, train_k_shot, train_k_query: training episode shape, when it differs.
        augment: random augmentation of training episodes (`conf/dataset/augment/`); None: none.
    """

    def __init__(
        self, root: str, n_way: int, k_shot: int, k_query: int, image_size: int, channels: int = 3,
        cache_dir: str | None = None, split_dirs: Sequence[str] = ("train", "val", "test"),
        csv_dir: str | None = None, train_n_way: int | None = None, train_k_shot: int | None = None,
        train_k_query: int | None = None, augment: Augment | None = None,
    ) -> None:
        positive_int("image_size", image_size)
        check_channels(channels)
        names = [str(name) for name in split_dirs]
        if len(names) != len(SPLITS):
            raise ValueError(f"split_dirs={names!r}: must name the train, val and test folders (three names)")
        base = Path(root).expanduser()
        cache = Path(cache_dir).expanduser() if cache_dir else None
        # A folder (or CSV) named twice serves two splits on purpose; two different ones may share no class.
        sources = {name: self._rows(base, name, names, csv_dir) for name in dict.fromkeys(names)}
        key = f"csv_dir={csv_dir!r}" if csv_dir is not None else f"root={str(base)!r}"
        check_disjoint({origin: rows for rows, origin in sources.values()}, key)
        loaded = {name: load_split(base, rows, origin, image_size=image_size, channels=channels, cache_dir=cache,
                                   name=f"imagefolder-{name}") for name, (rows, origin) in sources.items()}
        splits: dict[Split, ClassImages] = {split: loaded[name] for split, name in zip(SPLITS, names)}
        super().__init__(splits, n_way, k_shot, k_query, train_n_way, train_k_shot, train_k_query,
                         channels=channels, augment=augment)

    @staticmethod
    def _rows(root: Path, name: str, names: list[str], csv_dir: str | None) -> tuple[Rows, str]:
        """The rows of split `name` and where they came from; a FileNotFoundError that shows the layout."""
        if csv_dir is not None:
            path = root / Path(csv_dir).expanduser() / f"{name}.csv"
            if not path.is_file():
                raise FileNotFoundError(f"root={str(root)!r}: no split file {path}; with csv_dir set, put "
                                        f"{', '.join(n + '.csv' for n in names)} (header `filename,label`) in "
                                        f"{path.parent} and the images at {root / 'images'}/<filename>")
            return read_csv_rows(path.read_text(), str(path)), str(path)
        if not (root / name).is_dir():
            raise FileNotFoundError(f"root={str(root)!r}: no {name}/ folder there; put the images at "
                                    f"{root}/<split>/<class>/<image> with <split> in {', '.join(names)} "
                                    f"(or give csv_dir for `filename,label` CSV splits)")
        return folder_rows(root, name), str(root / name)
