"""CIFAR-FS and FC100 on a generated archive in the real CIFAR-100 python format."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import metalearn.data.cifar as cifar_module
from metalearn.data.cifar import CIFAR_FS_CLASSES, CIFARFS, FC100, FC100_SUPERCLASSES, load_cifar100
from tests.fakes import COARSE_NAMES, COARSE_OF, FINE_NAMES, fake_pixels, make_fake_cifar100


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_cifar100(tmp_path_factory.mktemp("cifar100")).parent


def disjoint(*groups: set[str]) -> bool:
    return sum(len(g) for g in groups) == len(set().union(*groups))


def test_cifar_fs_split_constants_are_the_standard_64_16_20() -> None:
    groups = [set(CIFAR_FS_CLASSES[s]) for s in ("train", "val", "test")]
    assert [len(g) for g in groups] == [64, 16, 20] and disjoint(*groups)
    assert set().union(*groups) == set(FINE_NAMES)


def test_fc100_split_constants_are_12_4_4_superclasses() -> None:
    groups = [set(FC100_SUPERCLASSES[s]) for s in ("train", "val", "test")]
    assert [len(g) for g in groups] == [12, 4, 4] and disjoint(*groups)
    assert set().union(*groups) == set(COARSE_NAMES)


def test_cifar_fs_classes_and_pixels(root: Path) -> None:
    data = CIFARFS(str(root), k_query=2)
    assert {s: d.num_classes for s, d in data.splits.items()} == {"train": 64, "val": 16, "test": 20}
    assert disjoint(*(set(d.class_names) for d in data.splits.values()))
    assert all(d.counts.tolist() == [3] * d.num_classes for d in data.splits.values())
    test = data.splits["test"]
    assert test.images.dtype == torch.uint8 and data.input_shape == (3, 32, 32)
    for label, name in enumerate(test.class_names):
        fine = FINE_NAMES.index(name)
        for index, image in enumerate(test.images[test.labels == label]):  # train images first, then test
            assert np.array_equal(image.numpy(), fake_pixels(fine, COARSE_OF[name], index))


def test_fc100_splits_by_superclass(root: Path) -> None:
    data = FC100(str(root), k_query=2)
    assert {s: d.num_classes for s, d in data.splits.items()} == {"train": 60, "val": 20, "test": 20}
    assert disjoint(*(set(d.class_names) for d in data.splits.values()))
    for split, images in data.splits.items():
        superclasses = {COARSE_NAMES[COARSE_OF[name]] for name in images.class_names}
        assert superclasses == set(FC100_SUPERCLASSES[split])
        # The blue plane's corner holds each image's coarse label: it must match the class's superclass.
        corner = images.images[:, 2, 0, 0].long()
        assert torch.equal(corner, torch.tensor([COARSE_OF[images.class_names[i]] for i in images.labels]))


def test_episodes_have_the_right_shape_and_range(root: Path) -> None:
    batch = FC100(str(root), n_way=5, k_shot=1, k_query=2).sample(3, "val", torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 5, 3, 32, 32) and batch.query_x.shape == (3, 10, 3, 32, 32)
    assert batch.support_x.dtype == torch.float32 and batch.query_y.tolist()[0] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert 0.0 <= float(batch.query_x.min()) and float(batch.query_x.max()) <= 1.0


def test_extracted_folder_equals_archive_and_resizing(root: Path, tmp_path: Path) -> None:
    folder = make_fake_cifar100(tmp_path, extracted=True)
    from_folder, from_archive = load_cifar100(folder.parent), load_cifar100(root)
    assert torch.equal(from_folder["images"], from_archive["images"]) and from_folder["images"].shape[0] == 300
    assert from_folder["fine_names"] == FINE_NAMES and from_folder["coarse_names"] == COARSE_NAMES
    small = load_cifar100(root, image_size=16)
    assert small["images"].shape == (300, 3, 16, 16)
    assert torch.equal(small["images"][:, 0], from_archive["images"][:, 0, :16, :16]), "red planes are constant"


def test_cache_is_shared_by_cifar_fs_and_fc100(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = CIFARFS(str(root), k_query=2, cache_dir=str(tmp_path))
    (cache,) = tmp_path.glob("cifar100-32px-v1-*.pt")
    stamp = cache.stat().st_mtime_ns
    monkeypatch.setattr(cifar_module, "_read_pickles", lambda *args: pytest.fail("decoded although cached"))
    again = CIFARFS(str(root), k_query=2, cache_dir=str(tmp_path))
    FC100(str(root), k_query=2, cache_dir=str(tmp_path))
    assert torch.equal(first.splits["val"].images, again.splits["val"].images)
    assert cache.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1


def test_missing_archive_says_how_to_fetch_it(tmp_path: Path) -> None:
    where = tmp_path / "cifar100"
    message = (rf"^root='{where}': neither cifar-100-python.tar.gz nor cifar-100-python/ is there; "
               rf"fetch it with `metalearn-data download cifar100 --root {where}`")
    with pytest.raises(FileNotFoundError, match=message):
        CIFARFS(str(where))
    with pytest.raises(FileNotFoundError, match=message):
        FC100(str(where))


def test_more_ways_than_classes_is_named(root: Path) -> None:
    with pytest.raises(ValueError, match="n_way=17: the val split has only 16 classes"):
        CIFARFS(str(root), n_way=17, k_query=2)
    with pytest.raises(ValueError, match="n_way=21: the val split has only 20 classes"):
        FC100(str(root), n_way=21, k_query=2)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple:
            return os.system, ("true",)

    folder = make_fake_cifar100(tmp_path, extracted=True)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": Exploit()}, protocol=2))
    with pytest.raises(ValueError, match=rf"^root='{tmp_path}': {folder / 'meta'} is not a readable CIFAR-100 pickle "
                                         r"\(.*system is not allowed in a CIFAR-100 pickle\): delete"):
        load_cifar100(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped byte"])
def test_a_damaged_archive_is_one_line_that_says_to_fetch_it_again(tmp_path: Path, damage: str) -> None:
    archive = make_fake_cifar100(tmp_path)
    blob = archive.read_bytes()
    archive.write_bytes({"truncated": blob[: len(blob) // 2], "garbage": bytes(range(256)) * 20,
                         "flipped byte": blob[:1000] + bytes([blob[1000] ^ 0xFF]) + blob[1001:]}[damage])
    with pytest.raises(ValueError) as raised:
        CIFARFS(str(tmp_path), k_query=2)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"root={str(tmp_path)!r}: {archive} is not a readable CIFAR-100 archive (truncated or "
                              "corrupt: ")
    assert message.endswith(f"): delete it and fetch it again with "
                            f"`metalearn-data download cifar100 --root {tmp_path}`")


def test_a_damaged_pickle_in_the_extracted_folder_is_named(tmp_path: Path) -> None:
    folder = make_fake_cifar100(tmp_path, extracted=True)
    (folder / "train").write_bytes((folder / "train").read_bytes()[:5000])
    with pytest.raises(ValueError, match=rf"^root='{tmp_path}': {folder / 'train'} is not a readable CIFAR-100 pickle "
                                         rf"\(truncated or corrupt: .*\): delete {folder} and fetch the archive again "
                                         r"with `metalearn-data download cifar100"):
        FC100(str(tmp_path), k_query=2)
