"""Generated datasets in the real on-disk layouts, for loaders whose real files are not available here
(mini-ImageNet images, CIFAR-100) and for users' own image folders."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metalearn.tasks import SPLITS


def miniimagenet_colour(class_index: int, image_index: int) -> tuple[int, int, int]:
    """The solid colour of image `image_index` of class `class_index` in `make_fake_miniimagenet` data."""
    return 16 * class_index + 8, 8 * image_index + 20, 200


def wnid(class_index: int) -> str:
    """A made-up WordNet id in ImageNet's format (`n` and 8 digits) for generated class `class_index`."""
    return f"n{class_index + 1:08d}"


def make_fake_miniimagenet(root: Path, classes_per_split: Sequence[int] = (6, 4, 4), images_per_class: int = 20,
                           size: int = 12) -> Path:
    """Write generated mini-ImageNet data in the real layout and return the folder of its split CSVs.

    Images go to `root/images/<wnid><8-digit index>.jpg` (as in the real data, e.g. `n0153282900000005.jpg`),
    solid `miniimagenet_colour(c, i)`; `root/splits/{train,val,test}.csv` list them as `filename,label`. Classes are
    numbered across splits, so no two splits share one. Pass the returned folder as `split_dir`.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    first = 0
    for split, count in zip(SPLITS, classes_per_split):
        lines = ["filename,label"]
        for c in range(first, first + count):
            for i in range(images_per_class):
                name = f"{wnid(c)}{i + 1:08d}.jpg"
                Image.new("RGB", (size, size), miniimagenet_colour(c, i)).save(root / "images" / name, quality=95)
                lines.append(f"{name},{wnid(c)}")
        (root / "splits" / f"{split}.csv").write_text("\n".join(lines) + "\n")
        first += count
    return root / "splits"


def folder_colour(class_index: int, image_index: int) -> tuple[int, int, int]:
    """The solid colour of image `image_index` of class `class_index` in `make_fake_image_folder` data."""
    return 20 * class_index + 10, 30 * image_index + 5, 200


def make_fake_image_folder(root: Path, classes_per_split: Sequence[int] = (5, 3, 3), images_per_class: int = 4,
                           size: int = 10, csv: bool = False) -> Path:
    """Write a small generated dataset in ImageFolder's layout and return `root`.

    Folders (default): `root/<split>/classNN/<i>.png`. With `csv=True`: `root/images/classNN_<i>.png` plus
    `root/splits/<split>.csv` (`filename,label`). Classes are numbered across splits (`class00`, ...), so
    no two splits share a class; every pixel of image i of class c is `folder_colour(c, i)` (lossless PNG).
    """
    first = 0
    for split, count in zip(SPLITS, classes_per_split):
        lines = ["filename,label"]
        for c in range(first, first + count):
            for i in range(images_per_class):
                image = Image.new("RGB", (size, size), folder_colour(c, i))
                if csv:
                    path = root / "images" / f"class{c:02d}_{i:03d}.png"
                    lines.append(f"{path.name},class{c:02d}")
                else:
                    path = root / split / f"class{c:02d}" / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
        if csv:
            (root / "splits").mkdir(parents=True, exist_ok=True)
            (root / "splits" / f"{split}.csv").write_text("\n".join(lines) + "\n")
        first += count
    return root


# CIFAR-100's 20 superclasses and their 5 classes each; label numbers follow alphabetical order, as in `meta`.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
COARSE_NAMES = sorted(CIFAR100_SUPERCLASSES)
FINE_NAMES = sorted(fine for fines in CIFAR100_SUPERCLASSES.values() for fine in fines)
COARSE_OF = {fine: COARSE_NAMES.index(coarse) for coarse, fines in CIFAR100_SUPERCLASSES.items() for fine in fines}


def fake_pixels(fine: int, coarse: int, index: int) -> np.ndarray:
    """Image `index` of fine class `fine` as [3, 32, 32]: red = fine label, green[y, x] = 4y + index,
    blue[y, x] = 4x + coarse label (so plane order and orientation can be checked after decoding)."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([np.full((32, 32), fine), 4 * y + index, 4 * x + coarse]).astype(np.uint8)


def make_fake_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1, extracted: bool = False) -> Path:
    """Write a tiny CIFAR-100 in the real python format and return its path.

    All 100 classes and 20 superclasses with the real label names and numbering, `train_per_class` +
    `test_per_class` images each (`fake_pixels`), interleaved across classes as in the real pickles
    (protocol 2, bytes keys, `data` uint8 [N, 3072]). Written as `root/cifar-100-python.tar.gz`, or as
    the extracted `root/cifar-100-python/` folder when `extracted` is true.
    """
    blobs: dict[str, dict[bytes, Any]] = {"meta": {b"fine_label_names": [n.encode() for n in FINE_NAMES],
                      b"coarse_label_names": [n.encode() for n in COARSE_NAMES]}}
    start = 0
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        pairs = [(fine, start + i) for i in range(per_class) for fine in range(100)]
        blobs[name] = {
            b"data": np.stack([fake_pixels(f, COARSE_OF[FINE_NAMES[f]], i).reshape(-1) for f, i in pairs]),
            b"fine_labels": [f for f, _ in pairs],
            b"coarse_labels": [COARSE_OF[FINE_NAMES[f]] for f, _ in pairs],
        }
        start += per_class
    if extracted:
        for name, blob in blobs.items():
            (root / "cifar-100-python").mkdir(parents=True, exist_ok=True)
            (root / "cifar-100-python" / name).write_bytes(pickle.dumps(blob, protocol=2))
        return root / "cifar-100-python"
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name in ("meta", "test", "train"):
            payload = pickle.dumps(blobs[name], protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return root / "cifar-100-python.tar.gz"
