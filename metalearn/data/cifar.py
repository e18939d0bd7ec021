"""CIFAR-FS and FC100 episodes, both cut from CIFAR-100 (Krizhevsky, 2009) by class.

CIFAR-100 has 100 classes of 600 32x32 colour images (500 in its `train` pickle, 100 in `test`; both are
used here) in 20 superclasses of 5 classes each. The two few-shot benchmarks split the classes:
    CIFAR-FS (Bertinetto et al., "Meta-learning with differentiable closed-form solvers", ICLR 2019):
        64 / 16 / 20 classes drawn at random, so a test class may share a superclass with train classes.
    FC100 (Oreshkin et al., "TADAM: Task dependent adaptive metric for improved few-shot learning",
        NeurIPS 2018): 12 / 4 / 4 superclasses (60 / 20 / 20 classes), so no test superclass is seen in
        training.

Both read the official `cifar-100-python.tar.gz` directly (or its extracted `cifar-100-python/` folder),
decode all 60,000 images once and cache them as uint8 in `cache_dir`; CIFAR-FS and FC100 share the cache.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from metalearn.checks import positive_int
from metalearn.data.augment import Augment
from metalearn.data.cache import cache_path, cached, file_identity
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.folder import damage_reason, to_array
from metalearn.data.images import ClassImages
from metalearn.tasks import SPLITS, Split

log = logging.getLogger(__name__)

ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
PICKLES = ("train", "test", "meta")
CACHE_VERSION = 1
# What a truncated or corrupt tar.gz or pickle raises (a tampered pickle: _RefusedPickle).
DAMAGED = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, pickle.UnpicklingError)

# CIFAR-FS split of Bertinetto et al. (2019), from tristandeleu/pytorch-meta
# torchmeta/datasets/assets/cifar100/cifar-fs/{train,val,test}.json (commit ac3c48e5889645a2d05dd9a13b35aa2d986c0bec);
# the same 64 / 16 / 20 classes as the lists in ArnoutDevos/maml-cifar-fs data/CIFARFS/get_cifarfs.py.
CIFAR_FS_CLASSES: dict[Split, tuple[str, ...]] = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle",
        "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin", "elephant",
        "forest", "girl", "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard", "lobster",
        "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate",
        "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper", "snake",
        "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train", "trout", "tulip", "turtle",
        "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp", "maple_tree",
        "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy", "rocket",
        "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm",
    ),
}

# FC100 superclass split of Oreshkin et al. (2018), from ServiceNow/TADAM datasets/create_dataset_cifar100.py
# (commit 6aa013c7dec5c4ee32f58bb2756f4798874c1725): coarse labels {1,2,3,4,5,6,9,10,15,17,18,19} / {8,11,13,16}
# / {0,7,12,14}, written here by name; tristandeleu/pytorch-meta's fc100 assets list the same superclasses.
FC100_SUPERCLASSES: dict[Split, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
        "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles", "trees",
        "vehicles_1", "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}


class _RefusedPickle(pickle.UnpicklingError):
    """A pickle asked for something other than the plain data the CIFAR pickles hold."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR pickles hold (dicts, lists, bytes, numpy arrays), so that a tampered
    archive cannot run code the way an unrestricted `pickle.load` would let it."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise _RefusedPickle(f"{module}.{name} is not allowed in a CIFAR-100 pickle")
        return super().find_class(module, name)


def _load_pickle(f: IO[bytes]) -> dict[bytes, Any]:
    loaded: dict[bytes, Any] = _ArrayUnpickler(f, encoding="bytes").load()
    return loaded


def cifar100_source(root: Path) -> Path:
    """The archive `root/cifar-100-python.tar.gz`, else the folder `root/cifar-100-python/`; else a clear error."""
    for candidate in (root / ARCHIVE, root / FOLDER):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"root={str(root)!r}: neither {ARCHIVE} nor {FOLDER}/ is there; fetch it with "
                            f"`metalearn-data download cifar100 --root {root}`")


def _read_pickles(root: Path, source: Path) -> dict[str, dict[bytes, Any]]:
    """The `train`, `test` and `meta` pickles, read from the extracted folder or streamed from the tar.gz; a
    damaged archive or pickle is a one-line ValueError that names it and says how to fetch it again."""
    fetch = f"`metalearn-data download cifar100 --root {root}`"
    pickles: dict[str, dict[bytes, Any]] = {}
    if source.is_dir():
        for name in PICKLES:
            with (source / name).open("rb") as f:  # outside the try: a missing file is not a damaged one
                try:
                    pickles[name] = _load_pickle(f)
                except DAMAGED as ex:
                    raise ValueError(f"root={str(root)!r}: {source / name} is not a readable CIFAR-100 pickle "
                                     f"({_why(ex)}): delete {source} and fetch the archive again with {fetch}") from ex
        return pickles
    try:
        with tarfile.open(source, "r|gz") as tar:  # a stream: one pass over the gzip, no seeking back
            for member in tar:
                folder, _, name = member.name.rpartition("/")
                stream = tar.extractfile(member) if folder == FOLDER and name in PICKLES else None
                if stream is not None:
                    pickles[name] = _load_pickle(stream)
    except DAMAGED as ex:
        raise ValueError(f"root={str(root)!r}: {source} is not a readable CIFAR-100 archive ({_why(ex)}): "
                         f"delete it and fetch it again with {fetch}") from ex
    missing = [f"{FOLDER}/{name}" for name in PICKLES if name not in pickles]
    if missing:
        raise ValueError(f"{source}: not the CIFAR-100 python archive (no {', '.join(missing)} in it)")
    return pickles


def _why(ex: BaseException) -> str:
    """Why a pickle or archive cannot be read: the refusal itself, or what a damaged file raised."""
    return str(ex) if isinstance(ex, _RefusedPickle) else damage_reason(ex)


def _names(values: list[bytes | str]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def _decode(root: Path, source: Path, image_size: int) -> dict[str, Any]:
    """All 60,000 images as uint8 [N, 3, S, S] with fine and coarse labels and both label name lists."""
    log.info("Decoding CIFAR-100 from %s", source)
    pickles = _read_pickles(root, source)
    parts = [pickles[name] for name in ("train", "test")]
    # Each row holds the red, then green, then blue 32x32 plane, row-major: exactly [3, 32, 32].
    pixels = np.concatenate([np.asarray(p[b"data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
    if image_size != 32:
        pixels = np.stack([to_array(Image.fromarray(image.transpose(1, 2, 0)), image_size, 3) for image in pixels])
    return {
        "images": torch.from_numpy(pixels),
        "fine": torch.tensor([label for p in parts for label in p[b"fine_labels"]], dtype=torch.int64),
        "coarse": torch.tensor([label for p in parts for label in p[b"coarse_labels"]], dtype=torch.int64),
        "fine_names": _names(pickles["meta"][b"fine_label_names"]),
        "coarse_names": _names(pickles["meta"][b"coarse_label_names"]),
    }


def load_cifar100(root: Path, image_size: int = 32, cache_dir: Path | None = None) -> dict[str, Any]:
    """All of CIFAR-100 (train and test pickles together), decoded once and cached.

    Args:
        root: the folder holding `cifar-100-python.tar.gz` or `cifar-100-python/`.
        image_size: side of the square images (32: as stored; otherwise resized with Lanczos filtering).
        cache_dir: where the decoded images are cached (None: no cache).

    Returns:
        A dict with `images` (uint8 [60000, 3, S, S]), `fine` and `coarse` (int64 labels per image),
        `fine_names` and `coarse_names` (label names, in label order).
    """
    positive_int("image_size", image_size)
    source = cifar100_source(root)
    files = [source / name for name in PICKLES] if source.is_dir() else [source]
    cache = cache_path(cache_dir, f"cifar100-{image_size}px-v{CACHE_VERSION}", (image_size, file_identity(files)))
    return cached(cache, lambda: _decode(root, source, image_size))


def select_classes(data: dict[str, Any], class_names: Sequence[str]) -> ClassImages:
    """The images of the named fine classes, labelled by their position in `class_names`."""
    fine_names: list[str] = data["fine_names"]
    unknown = sorted(set(class_names) - set(fine_names))
    if unknown:
        raise ValueError(f"classes {', '.join(unknown)} are not CIFAR-100 fine classes of this archive")
    relabel = torch.full((len(fine_names),), -1, dtype=torch.int64)
    relabel[[fine_names.index(name) for name in class_names]] = torch.arange(len(class_names))
    labels = relabel[data["fine"]]
    keep = labels >= 0
    return ClassImages(data["images"][keep], labels[keep], class_names)


def fc100_classes(data: dict[str, Any], superclasses: tuple[str, ...]) -> list[str]:
    """The fine classes of the named superclasses, in fine-label order."""
    coarse_names: list[str] = data["coarse_names"]
    unknown = sorted(set(superclasses) - set(coarse_names))
    if unknown:
        raise ValueError(f"superclasses {', '.join(unknown)} are not CIFAR-100 superclasses of this archive")
    wanted = torch.tensor([coarse_names.index(name) for name in superclasses])
    fine = torch.unique(data["fine"][torch.isin(data["coarse"], wanted)])
    return [data["fine_names"][i] for i in fine.tolist()]


class CIFARFS(EpisodeSampler):
    """CIFAR-FS N-way K-shot episodes (Bertinetto et al., 2019): 64 / 16 / 20 CIFAR-100 classes of 600 images.

    Args:
        root: folder holding `cifar-100-python.tar.gz` or its extracted `cifar-100-python/`.
        n_way, k_shot, k_query: episode shape at evaluation (and at training unless overridden).
        image_size: side of the square RGB images (32 as stored; other sizes are resized).
        cache_dir: where decoded images are cached (None: no cache).
        train_n_way, train_k_shot, train_k_query: training episode shape, when it differs.
        channels: must be 3 (colour); models read their input channels from it.
        augment: random augmentation of training episodes (`conf/dataset/augment/`); None: none.
    """

    def __init__(
        self, root: str, n_way: int = 5, k_shot: int = 1, k_query: int = 15, image_size: int = 32,
        cache_dir: str | None = None, train_n_way: int | None = None, train_k_shot: int | None = None,
        train_k_query: int | None = None, channels: int = 3,
        augment: Augment | None = None,
    ) -> None:
        data = load_cifar100(Path(root).expanduser(), image_size, Path(cache_dir).expanduser() if cache_dir else None)
        splits = {split: select_classes(data, CIFAR_FS_CLASSES[split]) for split in SPLITS}
        super().__init__(splits, n_way, k_shot, k_query, train_n_way, train_k_shot, train_k_query,
                         channels=channels, augment=augment)


class FC100(EpisodeSampler):
    """FC100 N-way K-shot episodes (Oreshkin et al., 2018): CIFAR-100 split by superclass, 12 / 4 / 4
    superclasses (60 / 20 / 20 classes of 600 images).

    Args:
        root: folder holding `cifar-100-python.tar.gz` or its extracted `cifar-100-python/`.
        n_way, k_shot, k_query: episode shape at evaluation (and at training unless overridden).
        image_size: side of the square RGB images (32 as stored; other sizes are resized).
        cache_dir: where decoded images are cached (None: no cache).
        train_n_way, train_k_shot, train_k_query: training episode shape, when it differs.
        channels: must be 3 (colour); models read their input channels from it.
        augment: random augmentation of training episodes (`conf/dataset/augment/`); None: none.
    """

    def __init__(
        self, root: str, n_way: int = 5, k_shot: int = 1, k_query: int = 15, image_size: int = 32,
        cache_dir: str | None = None, train_n_way: int | None = None, train_k_shot: int | None = None,
        train_k_query: int | None = None, channels: int = 3,
        augment: Augment | None = None,
    ) -> None:
        data = load_cifar100(Path(root).expanduser(), image_size, Path(cache_dir).expanduser() if cache_dir else None)
        splits = {split: select_classes(data, fc100_classes(data, FC100_SUPERCLASSES[split])) for split in SPLITS}
        super().__init__(splits, n_way, k_shot, k_query, train_n_way, train_k_shot, train_k_query,
                         channels=channels, augment=augment)
