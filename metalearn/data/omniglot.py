"""Omniglot (Lake et al., 2015) episodes, read from the official archives or extracted folders.

Split schemes:
    vinyals: the standard few-shot benchmark (Vinyals et al., 2016): 1028 / 172 / 423 characters from
        the background and evaluation sets together, each rotated by 0/90/180/270 degrees as a class of
        its own (4112 / 688 / 1692 classes).
    vinyals_trainval: vinyals, trained on its train and val characters together (1200 characters, 4800
        classes), as Snell et al. (2017) trained for the figures they report. Validation still draws
        from the 172 val characters, which are now training classes: it tracks fitting and chooses
        the checkpoint without ever seeing a test class, but it is no estimate of held-out accuracy.
    lake: test on the 20 evaluation alphabets (659 characters) as in Lake et al.; validate on the five
        background alphabets `LAKE_VAL_ALPHABETS` (151 characters) and train on the other 25 (813).
        Lake's protocol has no validation alphabets, and choosing checkpoints on the test alphabets
        would tune on test classes.
    small1, small2: the "minimal" setting: train on a 5-alphabet small background set (136 / 156
        characters), validate on the 25 background alphabets outside it (828 / 808), test as lake.
Apart from vinyals_trainval's validation characters, no character is in two splits of any scheme.

Decoded images are cached as uint8 tensors in `cache_dir`, so later starts load in about a second.

Resampling the 105x105 binary drawings to `image_size`: `lanczos` (the default) keeps anti-aliased gray
edges; `nearest` keeps the drawings binary (strokes 1, background 0), as the loader of Snell et al.'s
Prototypical Networks code makes them (Pillow resizes a 1-bit image with nearest-neighbour sampling).
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metalearn.checks import one_of, positive_int
from metalearn.data.augment import Augment
from metalearn.data.cache import cache_path, cached, file_identity
from metalearn.data.download import download as fetch_dataset
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.folder import IMAGE_ERRORS, damage_reason
from metalearn.data.images import ClassImages
from metalearn.tasks import Split

log = logging.getLogger(__name__)

ARCHIVES = {
    "background": "images_background",
    "evaluation": "images_evaluation",
    "small1": "images_background_small1",
    "small2": "images_background_small2",
}
SCHEMES = ("vinyals", "vinyals_trainval", "lake", "small1", "small2")
ROTATIONS = (0, 90, 180, 270)
CACHE_VERSION = 1
RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
# The lake scheme's validation alphabets: the last five of the 30 background alphabets in sorted order,
# named rather than computed so that a partial copy of the data cannot shift the set.
LAKE_VAL_ALPHABETS = ("Ojibwe_(Canadian_Aboriginal_Syllabics)", "Sanskrit", "Syriac_(Estrangelo)", "Tagalog",
                      "Tifinagh")
# What reading a damaged zip or decoding a damaged PNG raises.
DAMAGED = (zipfile.BadZipFile, EOFError, *IMAGE_ERRORS)


def _source(root: Path, archive: str) -> Path:
    """The extracted folder or the zip of `archive` under `root`; a clear error if neither exists."""
    name = ARCHIVES[archive]
    for candidate in (root / name, root / f"{name}.zip"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"root={str(root)!r}: neither {name}.zip nor {name}/ is there; set paths.data_dir to the folder "
        f"holding omniglot/, or fetch it with `metalearn-data download omniglot --root {root}`")


def _folder_drawings(folder: Path) -> list[tuple[str, int, int]]:
    """(path, size, modification time in ns) of every `Alphabet/characterNN/*.png` in an extracted folder,
    sorted by path (the order of the zip's entries)."""
    found = []
    for alphabet in os.scandir(folder):
        if not alphabet.is_dir():
            continue
        for character in os.scandir(alphabet.path):
            if not character.is_dir():
                continue
            for entry in os.scandir(character.path):
                if entry.name.endswith(".png") and entry.is_file():
                    stat = entry.stat()
                    found.append((entry.path, stat.st_size, stat.st_mtime_ns))
    return sorted(found)


def _decode(png: bytes, image_size: int, resample: str) -> np.ndarray:
    """105x105 binary drawing -> image_size^2 uint8 with bright strokes on a dark background, resampled
    with `resample` (a key of RESAMPLING)."""
    with Image.open(io.BytesIO(png)) as image:
        gray = image.convert("L").resize((image_size, image_size), RESAMPLING[resample])
    return 255 - np.asarray(gray, dtype=np.uint8)


def _decode_source(root: Path, source: Path, image_size: int, files: list[tuple[str, int, int]],
                   resample: str) -> dict[str, Any]:
    """Decode every drawing of a zip, or of an extracted folder (`files`: its drawings); a damaged zip or
    drawing is a one-line ValueError that names it and says how to get a good copy."""
    log.info("Decoding Omniglot drawings from %s (once; later starts load the cache)", source)
    fetch = f"`metalearn-data download omniglot --root {root}`"
    arrays, characters = [], []
    if source.is_dir():
        for path, _, _ in files:
            png = Path(path).read_bytes()  # outside the try: a missing or unreadable file is not a damaged one
            try:
                arrays.append(_decode(png, image_size, resample))
            except DAMAGED as ex:
                raise ValueError(f"root={str(root)!r}: {path} is not a readable PNG drawing ({damage_reason(ex)}): "
                                 f"delete {source} and extract or fetch it again with {fetch}") from ex
            characters.append(Path(path).relative_to(source).parent.as_posix())
    else:
        with source.open("rb") as f:
            try:
                with zipfile.ZipFile(f) as z:
                    for entry in sorted(n for n in z.namelist() if n.endswith(".png")):
                        arrays.append(_decode(z.read(entry), image_size, resample))
                        characters.append(entry.split("/", 1)[1].rsplit("/", 1)[0])
            except DAMAGED as ex:
                raise ValueError(f"root={str(root)!r}: {source} is not a readable zip archive "
                                 f"({damage_reason(ex)}): delete it and fetch it again with {fetch}") from ex
    if not arrays:
        raise ValueError(f"root={str(root)!r}: {source} holds no drawings (<alphabet>/<character>/*.png); delete "
                         f"it and fetch it again with {fetch}")
    return {"images": torch.from_numpy(np.stack(arrays)).unsqueeze(1), "characters": characters}


def load_archive(root: Path, archive: str, image_size: int, cache_dir: Path | None,
                 resample: str = "lanczos") -> tuple[torch.Tensor, list[str]]:
    """All drawings of one archive, decoded once and cached.

    Args:
        root: the folder holding the archive's zip or its extracted folder.
        archive: background, evaluation, small1 or small2.
        image_size: side of the square images.
        cache_dir: where decoded images are cached (None: no cache).
        resample: lanczos or nearest (see the module docstring).

    Returns:
        uint8 images [N, 1, S, S] and each drawing's `Alphabet/characterNN`, in archive order.
    """
    source = _source(root, archive)
    # A zip is known by its path, size and modification time. A folder's own stat would miss a drawing
    # rewritten in place (unzipping over an older copy, an edited file), so an extracted folder is known
    # by those of every drawing in it: listing the 19,280 background drawings takes about 0.1 s.
    files = _folder_drawings(source) if source.is_dir() else []
    identity = (image_size, files if source.is_dir() else file_identity([source]))
    # lanczos keeps the name (and so the caches) it had before resampling could be chosen.
    style = "" if resample == "lanczos" else f"-{resample}"
    cache = cache_path(cache_dir, f"omniglot-{archive}-{image_size}px{style}-v{CACHE_VERSION}", identity)
    saved = cached(cache, lambda: _decode_source(root, source, image_size, files, resample))
    return saved["images"], saved["characters"]


def _vinyals_lines(split: str) -> list[str]:
    text = resources.files("metalearn.data").joinpath("splits", "omniglot_vinyals", f"{split}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _classes(images: torch.Tensor, characters: list[str], names: list[str]) -> ClassImages:
    """Gather the drawings of classes `names` (`Alphabet/characterNN[/rotDDD]`), rotating where asked."""
    by_character: dict[str, list[int]] = {}
    for i, character in enumerate(characters):
        by_character.setdefault(character, []).append(i)
    parts, labels = [], []
    # A rotated alphabet is an alphabet of its own (for within-alphabet episodes).
    alphabets = sorted({_group(name) for name in names})
    groups = torch.tensor([alphabets.index(_group(name)) for name in names])
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


def _alphabet(name: str) -> str:
    return name.split("/", 1)[0]


def _group(name: str) -> tuple[str, int]:
    """(alphabet, rotation in degrees) of a class name `Alphabet/characterNN[/rotDDD]`."""
    return _alphabet(name), int(name.partition("/rot")[2] or 0)


def _rotated(names: list[str], rotations: tuple[int, ...] | None) -> list[str]:
    """Training class names with `rotations`: a name list that has rotations (vinyals) keeps those in
    `rotations`; one without (lake, small) gains a class per character and rotation. None: unchanged."""
    if rotations is None:
        return names
    if any("/rot" in name for name in names):
        return [name for name in names if _group(name)[1] in rotations]
    return [f"{name}/rot{r:03d}" for name in names for r in rotations]


def _scheme(root: Path, split: str, image_size: int, cache: Path | None,
            rotations: tuple[int, ...] | None = None, resample: str = "lanczos") -> dict[Split, ClassImages]:
    """The train, val and test classes of split scheme `split` (see the module docstring), the training
    classes with `rotations` (see `_rotated`)."""
    evaluation = load_archive(root, "evaluation", image_size, cache, resample)
    background = load_archive(root, "background", image_size, cache, resample)
    if split.startswith("vinyals"):
        images = torch.cat([background[0], evaluation[0]])
        characters = background[1] + evaluation[1]
        lists = {"train": "trainval" if split == "vinyals_trainval" else "train", "val": "val", "test": "test"}
        listed = {s: _vinyals_lines(lists[s]) for s in ("train", "val", "test")}
        listed["train"] = _rotated(listed["train"], rotations)
        return {s: _classes(images, characters, listed[s]) for s in ("train", "val", "test")}
    test = _classes(*evaluation, sorted(set(evaluation[1])))
    names = sorted(set(background[1]))
    if split == "lake":
        missing = sorted(set(LAKE_VAL_ALPHABETS) - {_alphabet(name) for name in names})
        if missing:
            raise ValueError(f"root={str(root)!r}: the background set lacks the alphabet {missing[0]}, which "
                             f"split=lake validates on; fetch it again with "
                             f"`metalearn-data download omniglot --root {root}`")
        val = [name for name in names if _alphabet(name) in LAKE_VAL_ALPHABETS]
        train = _classes(*background, _rotated([name for name in names if _alphabet(name) not in LAKE_VAL_ALPHABETS],
                                               rotations))
    else:  # the small set trains; the background alphabets outside it validate
        small = load_archive(root, split, image_size, cache, resample)
        held_in = {_alphabet(name) for name in small[1]}
        val = [name for name in names if _alphabet(name) not in held_in]
        train = _classes(*small, _rotated(sorted(set(small[1])), rotations))
    return {"train": train, "val": _classes(*background, val), "test": test}


class Omniglot(EpisodeSampler):
    """Omniglot N-way K-shot episodes.

    Args:
        root: folder holding the archives (`images_background.zip`, ...) or their extracted folders.
        split: split scheme, one of vinyals, vinyals_trainval, lake, small1, small2.
        n_way, k_shot, k_query: episode shape at evaluation (and at training unless overridden).
        image_size: side of the square images (28 in the standard benchmark).
        resample: how drawings are resized to image_size: lanczos (gray edges) or nearest (binary, as
            Snell et al.'s code loads them).
        cache_dir: where decoded images are cached (None: no cache).
        train_n_way, train_k_shot, train_k_query: training episode shape, when it differs.
        within_alphabet: draw each episode's characters from a single alphabet (Lake et al.'s
            within-alphabet one-shot task; harder, since characters of one alphabet look alike). A
            rotated alphabet counts as an alphabet of its own.
        rotations: the rotations (degrees: 0, 90, 180, 270) whose rotated characters are classes of
            their own in the training split, as the few-shot literature adds them. None: the scheme's
            own (vinyals and vinyals_trainval: all four, in every split, as their class lists give;
            lake, small1, small2: none). Validation and test classes stay as the scheme has them.
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
        augment: Augment | None = None, rotations: Sequence[int] | None = None, resample: str = "lanczos",
    ) -> None:
        one_of("split", split, SCHEMES)
        one_of("resample", resample, tuple(RESAMPLING))
        if rotations is not None and (not rotations or len(set(rotations)) != len(rotations)
                                      or any(r not in ROTATIONS for r in rotations)):
            raise ValueError(f"rotations={list(rotations)!r}: must be distinct values among 0, 90, 180, 270, "
                             "or null for the split's own")
        positive_int("image_size", image_size)
        base, cache = Path(root).expanduser(), Path(cache_dir).expanduser() if cache_dir else None
        if download:
            needed = ("background", "evaluation", *((split,) if split.startswith("small") else ()))
            missing = [f"{ARCHIVES[a]}.zip" for a in needed
                       if not (base / f"{ARCHIVES[a]}.zip").is_file() and not (base / ARCHIVES[a]).is_dir()]
            if missing:
                fetch_dataset("omniglot", base, mirror=mirror, only=missing)
        splits = _scheme(base, split, image_size, cache, None if rotations is None else tuple(map(int, rotations)),
                         resample)
        super().__init__(splits, n_way, k_shot, k_query, train_n_way, train_k_shot, train_k_query,
                         within_group=within_alphabet, channels=channels, augment=augment)
