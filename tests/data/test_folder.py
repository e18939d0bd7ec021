"""ImageFolder on generated images in both layouts: classes, pixels, grayscale, caching, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metalearn.data.folder as folder_module
from metalearn.data.folder import ImageFolder, load_split
from metalearn.tasks import SPLITS
from tests.fakes import folder_colour as colour_of
from tests.fakes import make_fake_image_folder


def folder(root: Path, **kwargs: object) -> ImageFolder:
    settings: dict = {"n_way": 3, "k_shot": 1, "k_query": 2, "image_size": 10, **kwargs}
    return ImageFolder(str(root), **settings)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_image_folder(tmp_path_factory.mktemp("folders"))


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_image_folder(tmp_path_factory.mktemp("csv"), csv=True)


def test_folders_give_classes_and_exact_pixels(folders: Path) -> None:
    data = folder(folders)
    assert {s: d.num_classes for s, d in data.splits.items()} == {"train": 5, "val": 3, "test": 3}
    assert data.splits["val"].class_names == ["class05", "class06", "class07"]
    names = [set(d.class_names) for d in data.splits.values()]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    train = data.splits["train"]
    assert train.images.dtype == torch.uint8 and train.images.shape == (20, 3, 10, 10)
    for label, name in enumerate(train.class_names):
        c = int(name.removeprefix("class"))
        block = train.images[train.labels == label]
        expected = torch.tensor([colour_of(c, i) for i in range(4)], dtype=torch.uint8)
        assert torch.equal(block[:, :, 4, 7], expected) and (block == block[:, :, :1, :1]).all()


def test_csv_layout_reads_the_same_images(folders: Path, csv_root: Path) -> None:
    from_folders = folder(folders)
    from_csv = folder(csv_root, csv_dir="splits")
    for split in SPLITS:
        a, b = from_folders.splits[split], from_csv.splits[split]
        assert a.class_names == b.class_names and torch.equal(a.images, b.images)


def test_grayscale_and_resizing(folders: Path) -> None:
    data = folder(folders, channels=1, image_size=6)
    test = data.splits["test"]
    assert test.images.shape == (12, 1, 6, 6) and data.input_shape == (1, 6, 6)
    expected = int(np.asarray(Image.new("RGB", (1, 1), colour_of(8, 2)).convert("L"))[0, 0])
    assert torch.all(test.images[test.labels == 0][2] == expected)


def test_episodes_have_the_right_shape_range_and_labels(folders: Path) -> None:
    data = folder(folders, k_query=3)
    batch = data.sample(4, "train", torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 3, 3, 10, 10) and batch.query_x.shape == (4, 9, 3, 10, 10)
    assert batch.support_x.dtype == torch.float32
    assert 0.0 <= float(batch.query_x.min()) and float(batch.query_x.max()) <= 1.0
    for task in batch:  # the red channel identifies the class: one class per episode label
        red = torch.cat([task.support_x, task.query_x])[:, 0, 0, 0].mul(255).round()
        labels = torch.cat([task.support_y, task.query_y])
        assert all(len(set(red[labels == k].tolist())) == 1 for k in range(3))
        assert len(set(red.tolist())) == 3


def test_a_folder_can_serve_two_splits(folders: Path) -> None:
    data = folder(folders, split_dirs=["train", "test", "test"])
    assert data.splits["val"] is data.splits["test"]


def test_cache_is_written_once_reused_and_renewed_when_an_image_changes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_fake_image_folder(tmp_path / "data", classes_per_split=(3, 3, 3), images_per_class=3)
    cache = tmp_path / "cache"
    first = folder(root, cache_dir=str(cache))
    files = sorted(cache.glob("imagefolder-*.pt"))
    assert [f.name.split("-")[1] for f in files] == ["test", "train", "val"]
    stamps = [f.stat().st_mtime_ns for f in files]
    with monkeypatch.context() as m:
        m.setattr(folder_module, "_decode", lambda *args: pytest.fail("decoded although cached"))
        again = folder(root, cache_dir=str(cache))
    assert torch.equal(first.splits["train"].images, again.splits["train"].images)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    Image.new("RGB", (10, 10), (1, 2, 3)).save(root / "train" / "class00" / "000.png")
    changed = folder(root, cache_dir=str(cache))
    assert len(list(cache.glob("imagefolder-train-*.pt"))) == 2
    assert changed.splits["train"].images[0, :, 0, 0].tolist() == [1, 2, 3]


def test_missing_folders_and_files_say_what_is_expected(tmp_path: Path, csv_root: Path) -> None:
    make_fake_image_folder(tmp_path / "partial")
    (tmp_path / "partial" / "val").rename(tmp_path / "partial" / "validation")
    with pytest.raises(FileNotFoundError, match=r"^root='.*partial': no val/ folder there; put the images at "
                                                r".*partial/<split>/<class>/<image>"):
        folder(tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match=r"^root='.*': no split file .*nowhere/train.csv"):
        folder(csv_root, csv_dir="nowhere")
    broken = make_fake_image_folder(tmp_path / "broken", csv=True)
    (broken / "images" / "class06_001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"class06_001.png is missing \(.*val.csv names it; 1 of 12"):
        folder(broken, csv_dir="splits")


def test_bad_settings_are_named(folders: Path) -> None:
    with pytest.raises(ValueError, match="channels=2: must be 1 \\(grayscale\\) or 3 \\(RGB\\)"):
        folder(folders, channels=2)
    with pytest.raises(ValueError, match="split_dirs=\\['train', 'test'\\]: must name"):
        folder(folders, split_dirs=("train", "test"))
    with pytest.raises(ValueError, match="n_way=4: the val split has only 3 classes"):
        folder(folders, n_way=4)
    with pytest.raises(ValueError, match="lists no images"):
        load_split(folders, [], "empty.csv", image_size=4, channels=3, cache_dir=None, name="x")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_image_is_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    root = make_fake_image_folder(tmp_path, classes_per_split=(3, 3, 3), images_per_class=2)
    image = root / "val" / "class04" / "001.png"
    image.write_bytes(image.read_bytes()[:40] if damage == "truncated" else b"not an image at all")
    with pytest.raises(ValueError) as raised:
        folder(root, k_query=1)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"root={str(root)!r}: {image} is not a readable image (truncated or corrupt")
    assert message.endswith("): replace it with a good copy")


def test_a_class_in_two_split_folders_is_rejected(tmp_path: Path) -> None:
    root = make_fake_image_folder(tmp_path, classes_per_split=(3, 3, 3), images_per_class=2)
    shutil.copytree(root / "train" / "class01", root / "test" / "class01")
    with pytest.raises(ValueError, match=rf"^root='{root}': class 'class01' is in both {root / 'train'} and "
                                         rf"{root / 'test'}; a class must be in one split only"):
        folder(root, k_query=1)


def test_a_class_in_two_split_csvs_is_rejected(tmp_path: Path) -> None:
    root = make_fake_image_folder(tmp_path, classes_per_split=(3, 3, 3), images_per_class=2, csv=True)
    val = root / "splits" / "val.csv"
    val.write_text(val.read_text() + "class00_000.png,class00\nclass00_001.png,class00\n")  # a train class
    with pytest.raises(ValueError, match=rf"^csv_dir='splits': class 'class00' is in both "
                                         rf"{root / 'splits' / 'train.csv'} and {val}; a class must be in one split"):
        folder(root, k_query=1, csv_dir="splits")
