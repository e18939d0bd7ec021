"""mini-ImageNet on generated JPEGs in the real layout, and the shipped Ravi & Larochelle split files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import metalearn.data.folder as folder_module
from metalearn.data.folder import read_csv_rows
from metalearn.data.miniimagenet import MiniImageNet, split_csv
from metalearn.tasks import SPLITS
from tests.fakes import make_fake_miniimagenet, wnid
from tests.fakes import miniimagenet_colour as colour_of


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("miniimagenet")
    return root, make_fake_miniimagenet(root)


def load(fake: tuple[Path, Path], **kwargs: object) -> MiniImageNet:
    root, split_dir = fake
    settings: dict = {"image_size": 12, "n_way": 4, "k_query": 5, "split_dir": str(split_dir), **kwargs}
    return MiniImageNet(str(root), **settings)


def test_splits_classes_and_pixels(fake: tuple[Path, Path]) -> None:
    data = load(fake)
    assert {s: d.num_classes for s, d in data.splits.items()} == {"train": 6, "val": 4, "test": 4}
    assert all(d.counts.tolist() == [20] * d.num_classes for d in data.splits.values())
    names = [set(d.class_names) for d in data.splits.values()]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert data.input_shape == (3, 12, 12)
    val = data.splits["val"]
    assert val.images.dtype == torch.uint8 and val.class_names[0] == wnid(6)
    for label, name in enumerate(val.class_names):
        c = int(name[1:]) - 1
        expected = torch.tensor([colour_of(c, i) for i in range(20)], dtype=torch.float32)
        got = val.images[val.labels == label].float().mean(dim=(2, 3))  # images in file (= CSV) order
        assert (got - expected).abs().max() <= 4, "JPEG may shift a solid colour by a few levels, no more"


def test_episodes_are_resized_rgb_in_unit_range(fake: tuple[Path, Path]) -> None:
    data = load(fake, image_size=8, n_way=4, k_shot=2)
    batch = data.sample(3, "test", torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 8, 3, 8, 8) and batch.query_x.shape == (3, 20, 3, 8, 8)
    assert batch.query_x.dtype == torch.float32 and batch.support_y.tolist()[0] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert 0.0 <= float(batch.support_x.min()) and float(batch.support_x.max()) <= 1.0


def test_cache_is_written_once_and_reused(fake: tuple[Path, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    first = load(fake, cache_dir=str(tmp_path))
    files = sorted(tmp_path.glob("miniimagenet-*-12px-3ch-*.pt"))
    assert len(files) == 3
    stamps = [f.stat().st_mtime_ns for f in files]
    monkeypatch.setattr(folder_module, "_decode", lambda *args: pytest.fail("decoded although cached"))
    again = load(fake, cache_dir=str(tmp_path))
    assert torch.equal(first.splits["train"].images, again.splits["train"].images)
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_missing_images_folder_says_where_to_put_the_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        MiniImageNet(str(tmp_path / "miniimagenet"))
    message = str(error.value)
    assert message.startswith(f"root={str(tmp_path / 'miniimagenet')!r}: no images/ folder there.")
    assert f"{tmp_path / 'miniimagenet' / 'images'}/<filename>.jpg" in message
    assert "cannot be downloaded" in message and "miniimagenet_ravi" in message


def test_a_missing_image_is_named(tmp_path: Path) -> None:
    split_dir = make_fake_miniimagenet(tmp_path, classes_per_split=(2, 2, 2), images_per_class=3, size=4)
    (tmp_path / "images" / f"{wnid(4)}00000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{wnid(4)}00000002.jpg is missing \(.*test.csv names it"):
        MiniImageNet(str(tmp_path), n_way=2, k_shot=1, k_query=1, image_size=4, split_dir=str(split_dir))


def test_more_ways_than_classes_is_named(fake: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="n_way=5: the val split has only 4 classes"):
        load(fake, n_way=5)


def test_shipped_ravi_split() -> None:
    """The packaged CSVs: 64 / 16 / 20 disjoint classes of 600 images, files named `<wnid><8 digits>.jpg`."""
    classes = {}
    for split, images in zip(SPLITS, (38400, 9600, 12000)):
        text, origin = split_csv(split)
        rows = read_csv_rows(text, origin)
        assert len(rows) == images and len({path for path, _ in rows}) == images
        assert all(path.startswith(f"images/{label}") and path.endswith(".jpg") for path, label in rows)
        labels = [label for _, label in rows]
        classes[split] = set(labels)
        assert all(labels.count(label) == 600 for label in classes[split])
    assert [len(c) for c in classes.values()] == [64, 16, 20]
    assert not classes["train"] & classes["val"] and not classes["train"] & classes["test"]
    assert not classes["val"] & classes["test"]


def test_a_truncated_photo_is_one_line_naming_it(tmp_path: Path) -> None:
    split_dir = make_fake_miniimagenet(tmp_path, classes_per_split=(2, 2, 2), images_per_class=3, size=16)
    photo = tmp_path / "images" / f"{wnid(1)}00000003.jpg"
    photo.write_bytes(photo.read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"^root='{tmp_path}': {photo} is not a readable image \(truncated or "
                                         r"corrupt: .*\): replace it with a good copy$"):
        MiniImageNet(str(tmp_path), n_way=2, k_shot=1, k_query=1, image_size=4, split_dir=str(split_dir))


def test_a_class_in_two_split_csvs_is_rejected(tmp_path: Path) -> None:
    split_dir = make_fake_miniimagenet(tmp_path, classes_per_split=(2, 2, 2), images_per_class=3, size=4)
    test = split_dir / "test.csv"
    test.write_text(test.read_text() + "".join(f"{wnid(1)}0000000{i}.jpg,{wnid(1)}\n" for i in (1, 2)))  # a train class
    with pytest.raises(ValueError, match=rf"^split_dir='{split_dir}': class '{wnid(1)}' is in both "
                                         rf"{split_dir / 'train.csv'} and {test}; a class must be in one split only"):
        MiniImageNet(str(tmp_path), n_way=2, k_shot=1, k_query=1, image_size=4, split_dir=str(split_dir))
