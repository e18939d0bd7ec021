"""Omniglot (Lake et al., 2015) episodes, read from the official archives or extracted folders.

Split schemes:
    vinyals: the standard few-shot benchmark (Vinyals et al., 2016): 1028 / 172 / 423 characters from
        the background and evaluation sets together, each rotated by 0/90/180/270 degrees as a class of
        its own (4112 / 688 / 1692 classes).
    lake: train on the 30 background alphabets, validate and test on the 20 evaluation alphabets (Lake's
        protocol has no separate validation alphabets; validation and test episodes differ by seed).
    small1, small2: the "minimal" setting: train on a 5-alphabet small background set, evaluate as lake.

Decoded images are cached as uint8 tensors in `cache_dir`, so later starts load in about a second.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metalearn.checkpoint import atomic_save
from metalearn.checks import one_of, positive_int
from metalearn.data.augment import Augment
from metalearn.data.download import download as fetch_dataset
from metalearn.data.episodes import ClassImages, EpisodeSampler
from metalearn.tasks import Split

log = logging.getLogger(__name__)

ARCHIVES = {
    "background": "images_background",
    "evaluation": "images_evaluation",
    "small1": "images_background_small1",
    "small2": "images_background_small2",
}
SCHEMES = ("vinyals", "lake", "small1", "small2")
CACHE_VERSION = 1


def _source(root: Path, archive: str) -> Path:
    """The extracted folder or the zip of `archive` under `root`; a clear error if neither exists."""
    name = ARCHIVES[archive]
    for candidate in (root / name, root / f"{name}.zip"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"root={str(root)!r}: neither {name}.zip nor {name}/ is there; set paths.data_dir to the folder "
        f"holding omniglot/, or fetch it with `metalearn-data download omniglot --root {root}`")


def _drawings(source: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (`Alphabet/characterNN/file.png`, PNG bytes) in sorted order, from a zip or a folder."""
    if source.is_dir():
        for path in sorted(source.glob("*/*/*.png")):
            yield path.relative_to(source).as_posix(), path.read_bytes()
        return
    with zipfile.ZipFile(source) as z:
        for entry in sorted(n for n in z.namelist() if n.endswith(".png")):
            yield entry.split("/", 1)[1], z.read(entry)


def _decode(png: bytes, image_size: int) -> np.ndarray:
    """105x105 binary drawing -> image_size^2 uint8 with bright strokes on a dark background."""
    with Image.open(io.BytesIO(png)) as image:
        gray = image.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(gray, dtype=np.uint8)


def load_archive(root: Path, archive: str, image_size: int, cache_dir: Path | None) -> tuple[torch.Tensor, list[str]]:
    """All drawings of one archive as uint8 [N, 1, S, S] plus each drawing's `Alphabet/characterNN`."""
    source = _source(root, archive)
    # The cache is keyed by the source's location and size, so another copy of the data is decoded anew.
    key = hashlib.sha256(f"{source.resolve()}:{source.stat().st_size}".encode()).hexdigest()[:12]
    cache = cache_dir / f"omniglot-{archive}-{image_size}px-{key}-v{CACHE_VERSION}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return saved["images"], saved["characters"]
    log.info("Decoding Omniglot %s from %s (once; cached in %s)", archive, source, cache_dir)
    arrays, characters = [], []
    for path, png in _drawings(source):
        arrays.append(_decode(png, image_size))
        characters.append(path.rsplit("/", 1)[0])
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    if cache is not None:
        atomic_save({"images": images, "characters": characters}, cache)
    return images, characters


def _vinyals_lines(split: str) -> list[str]:
    text = resources.files("metalearn.data").joinpath("splits", "omniglot_vinyals", f"{split}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _classes(images: torch.Tensor, characters: list[str], names: list[str]) -> ClassImages:
    """Gather the drawings of classes `names` (`Alphabet/characterNN[/rotDDD]`), rotating where asked."""
    by_character: dict[str, list[int]] = {}
    for i, character in enumerate(characters):
        by_character.setdefault(character, []).append(i)
    parts, labels = [], []
    alphabets = sorted({name.split("/", 1)[0] for name in names})
    groups = torch.tensor([alphabets.index(name.split("/", 1)[0]) for name in names])
    for label, name in enumerate(names):
        character, _, rotation = name.partition("/rot")
        if character not in by_character:
            raise ValueError(f"class {name!r} is not in the Omniglot archives that were read")
        drawings = images[by_character[character]]
        if rotation:
            drawings = torch.rot90(drawings, int(rotation) // 90, dims=(-2, -1))
        parts.append(drawings)
        labels.append(torch.full((len(drawings),), label, dtype=torch.int64))
    return ClassImages(torch.cat(parts), torch.cat(labels), names, groups)


class Omniglot(EpisodeSampler):
    """Omniglot N-way K-shot episodes.

    Args:
        root: folder holding the archives (`images_background.zip`, ...) or their extracted folders.
        split: split scheme, one of vinyals, lake, small1, small2.
        n_way, k_shot, k_query: episode shape at evaluation (and at training unless overridden).
        image_size: side of the square images (28 in the standard benchmark).
        cache_dir: where decoded images are cached (None: no cache).
        train_n_way, train_k_shot, train_k_query: training episode shape, when it differs.
        within_alphabet: draw each episode's characters from a single alphabet (Lake et al.'s
            within-alphabet one-shot task; harder, since characters of one alphabet look alike).
        download: fetch the archives this split needs into `root` if missing (checksummed).
        mirror: fetch from this base URL instead of the official repository.
        channels: must be 1 (Omniglot is grayscale); models read their input channels from it.
        augment: random augmentation of training episodes (`conf/dataset/augment/`); None: none.
    """

    def __init__(
        self, root: str, split: str = "vinyals", n_way: int = 5, k_shot: int = 1, k_query: int = 15,
        image_size: int = 28, cache_dir: str | None = None, train_n_way: int | None = None,
        train_k_shot: int | None = None, train_k_query: int | None = None, within_alphabet: bool = False,
        download: bool = False, mirror: str | None = None, channels: int = 1,
        augment: Augment | None = None,
    ) -> None:
        one_of("split", split, SCHEMES)
        positive_int("image_size", image_size)
        base, cache = Path(root).expanduser(), Path(cache_dir).expanduser() if cache_dir else None
        if download:
            needed = ("background", "evaluation") if split in ("vinyals", "lake") else (split, "evaluation")
            missing = [f"{ARCHIVES[a]}.zip" for a in needed
                       if not (base / f"{ARCHIVES[a]}.zip").is_file() and not (base / ARCHIVES[a]).is_dir()]
            if missing:
                fetch_dataset("omniglot", base, mirror=mirror, only=missing)
        evaluation = load_archive(base, "evaluation", image_size, cache)
        splits: dict[Split, ClassImages]
        if split == "vinyals":
            background = load_archive(base, "background", image_size, cache)
            images = torch.cat([background[0], evaluation[0]])
            characters = background[1] + evaluation[1]
            splits = {s: _classes(images, characters, _vinyals_lines(s)) for s in ("train", "val", "test")}
        else:
            train = load_archive(base, "background" if split == "lake" else split, image_size, cache)
            test = _classes(*evaluation, sorted(set(evaluation[1])))
            splits = {"train": _classes(*train, sorted(set(train[1]))), "val": test, "test": test}
        super().__init__(splits, n_way, k_shot, k_query, train_n_way, train_k_shot, train_k_query,
                         within_group=within_alphabet, channels=channels, augment=augment)
