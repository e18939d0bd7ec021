"""Omniglot on the real archives: split sizes, disjoint splits, zip vs folder, caching, errors."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from metalearn.data.omniglot import Omniglot, load_archive


@pytest.fixture(scope="module")
def vinyals(omniglot_root: Path, cache_dir: Path) -> Omniglot:
    return Omniglot(str(omniglot_root), cache_dir=str(cache_dir))


def test_vinyals_split_sizes(vinyals: Omniglot) -> None:
    counts = {split: images.num_classes for split, images in vinyals.splits.items()}
    assert counts == {"train": 4112, "val": 688, "test": 1692}
    assert all(int(images.counts.min()) == int(images.counts.max()) == 20 for images in vinyals.splits.values())
    assert vinyals.input_shape == (1, 28, 28)


def test_vinyals_splits_share_no_character(vinyals: Omniglot) -> None:
    characters = {split: {name.rsplit("/rot", 1)[0] for name in images.class_names}
                  for split, images in vinyals.splits.items()}
    assert len(characters["train"]) == 1028 and len(characters["val"]) == 172 and len(characters["test"]) == 423
    assert not characters["train"] & characters["val"]
    assert not characters["train"] & characters["test"] and not characters["val"] & characters["test"]


def test_rotated_classes_are_rotations(vinyals: Omniglot) -> None:
    train = vinyals.splits["train"]
    base = train.class_names.index("Angelic/character01/rot000")
    turned = train.class_names.index("Angelic/character01/rot090")
    first = train.images[train.offsets[base]: train.offsets[base] + 20]
    second = train.images[train.offsets[turned]: train.offsets[turned] + 20]
    assert torch.equal(torch.rot90(first, 1, dims=(-2, -1)), second)
    assert first.float().mean() < 80, "strokes should be bright on a dark background"


def test_episodes_from_real_omniglot(vinyals: Omniglot) -> None:
    batch = vinyals.sample(3, "test", torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 5, 1, 28, 28) and batch.query_x.shape == (3, 75, 1, 28, 28)
    assert 0.0 <= float(batch.support_x.min()) and float(batch.support_x.max()) <= 1.0
    for task in batch:  # support and query never share a drawing
        flat_s, flat_q = task.support_x.flatten(1), task.query_x.flatten(1)
        assert not (torch.cdist(flat_s, flat_q) == 0).any()


@pytest.mark.parametrize(("split", "train_classes"), [("lake", 964), ("small1", 136), ("small2", 156)])
def test_other_schemes(omniglot_root: Path, cache_dir: Path, split: str, train_classes: int) -> None:
    data = Omniglot(str(omniglot_root), split=split, cache_dir=str(cache_dir))
    assert data.splits["train"].num_classes == train_classes
    assert data.splits["test"].num_classes == 659
    assert not set(data.splits["train"].class_names) & set(data.splits["test"].class_names)


def test_extracted_folder_equals_zip(omniglot_root: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(omniglot_root / "images_background_small1.zip") as archive:
        archive.extractall(tmp_path)
    from_folder = load_archive(tmp_path, "small1", 14, None)
    from_zip = load_archive(omniglot_root, "small1", 14, None)
    assert from_folder[1] == from_zip[1] and torch.equal(from_folder[0], from_zip[0])
    assert from_zip[0].shape == (2720, 1, 14, 14)


def test_cache_is_written_once_and_reused(omniglot_root: Path, tmp_path: Path) -> None:
    images, _ = load_archive(omniglot_root, "small2", 10, tmp_path)
    (cache,) = tmp_path.glob("omniglot-small2-10px-*.pt")
    stamp = cache.stat().st_mtime_ns
    again, _ = load_archive(omniglot_root, "small2", 10, tmp_path)
    assert torch.equal(images, again) and cache.stat().st_mtime_ns == stamp


def test_missing_archives_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="root=.*images_evaluation.zip.*paths.data_dir"):
        Omniglot(str(tmp_path / "nowhere"))


def test_bad_settings_are_named(omniglot_root: Path, cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="split='bogus'"):
        Omniglot(str(omniglot_root), split="bogus")
    with pytest.raises(ValueError, match="k_query=15: with k_shot=10 an episode needs 25 images per class; the train "
                       "split has classes with only 20"):
        Omniglot(str(omniglot_root), k_shot=10, cache_dir=str(cache_dir))


def test_lake_within_alphabet(omniglot_root: Path, cache_dir: Path) -> None:
    data = Omniglot(str(omniglot_root), split="lake", within_alphabet=True, n_way=20, cache_dir=str(cache_dir))
    assert int(data.splits["train"].groups.max()) + 1 == 30 and int(data.splits["test"].groups.max()) + 1 == 20
    test = data.splits["test"]
    batch = data.sample(20, "test", torch.Generator().manual_seed(0))
    for task in batch:
        # Map each support image back to its class (exact pixel match) and check one alphabet per episode.
        flat = test.images.flatten(1).float() / 255
        rows = torch.cdist(task.support_x.flatten(1), flat).argmin(dim=1)
        alphabets = {test.class_names[int(test.labels[r])].split("/")[0] for r in rows}
        assert len(alphabets) == 1


def test_download_true_fetches_missing_archives(omniglot_root: Path, tmp_path: Path) -> None:
    """dataset.download=true fetches exactly the missing archives (from a file:// mirror here) and loads them."""
    root = tmp_path / "omniglot"
    root.mkdir()
    shutil.copy(omniglot_root / "images_evaluation.zip", root)
    data = Omniglot(str(root), split="small1", download=True, mirror=omniglot_root.as_uri(), image_size=8)
    assert sorted(p.name for p in root.iterdir()) == ["images_background_small1.zip", "images_evaluation.zip"]
    assert data.splits["train"].num_classes == 136
