"""Omniglot on the real archives (split sizes, zip vs folder, caching) and on generated ones (what each split
scheme trains, validates and tests on; changed and damaged archives and caches)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import metalearn.data.omniglot as omniglot_module
from metalearn.data.omniglot import SCHEMES, Omniglot, load_archive
from tests.data.fake_omniglot import (
    BACKGROUND_ALPHABETS,
    SMALL_ALPHABETS,
    archive_characters,
    drawing_value,
    make_fake_omniglot,
    png,
)


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


def test_vinyals_trainval_trains_on_train_and_val(omniglot_root: Path, cache_dir: Path, vinyals: Omniglot) -> None:
    """Snell et al.'s training set: the 1200 train and val characters (4800 classes); val and test as vinyals."""
    trainval = Omniglot(str(omniglot_root), split="vinyals_trainval", cache_dir=str(cache_dir))
    assert {s: images.num_classes for s, images in trainval.splits.items()} == {"train": 4800, "val": 688, "test": 1692}
    assert set(trainval.splits["train"].class_names) == (set(vinyals.splits["train"].class_names)
                                                        | set(vinyals.splits["val"].class_names))
    for split in ("val", "test"):
        assert trainval.splits[split].class_names == vinyals.splits[split].class_names
        assert torch.equal(trainval.splits[split].images, vinyals.splits[split].images)


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


@pytest.mark.parametrize(("split", "classes"), [("lake", (813, 151)), ("small1", (136, 828)), ("small2", (156, 808))])
def test_other_schemes(omniglot_root: Path, cache_dir: Path, split: str, classes: tuple[int, int]) -> None:
    data = Omniglot(str(omniglot_root), split=split, cache_dir=str(cache_dir))
    assert (data.splits["train"].num_classes, data.splits["val"].num_classes) == classes
    assert data.splits["test"].num_classes == 659
    names = {s: set(images.class_names) for s, images in data.splits.items()}
    assert not names["train"] & names["val"] and not names["train"] & names["test"]
    assert not names["val"] & names["test"]


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


def test_nearest_resampling_keeps_drawings_binary_and_caches_apart(omniglot_root: Path, tmp_path: Path) -> None:
    """resample=nearest: every pixel is a stroke (255) or background (0), each the drawing's pixel at
    the sampled position, as Snell et al.'s loader makes them; lanczos has gray edges. The two are
    cached in separate files, so switching never loads the other's images."""
    import io

    import numpy as np
    from PIL import Image

    nearest, characters = load_archive(omniglot_root, "small2", 28, tmp_path, "nearest")
    lanczos, _ = load_archive(omniglot_root, "small2", 28, tmp_path)
    assert len(list(tmp_path.glob("omniglot-small2-28px-*.pt"))) == 2
    assert set(nearest.unique().tolist()) == {0, 255}
    assert len(lanczos.unique()) > 100
    with zipfile.ZipFile(omniglot_root / "images_background_small2.zip") as archive:
        first = sorted(n for n in archive.namelist() if n.endswith(".png"))[0]
        with Image.open(io.BytesIO(archive.read(first))) as image:
            drawing = np.asarray(image.convert("L"))  # 105x105, strokes black
    centres = ((np.arange(28) + 0.5) * 105 / 28).astype(int)  # nearest-neighbour sampling positions
    expected = 255 - drawing[np.ix_(centres, centres)]
    assert np.array_equal(nearest[0, 0].numpy(), expected) and characters[0] in first
    with pytest.raises(ValueError, match="resample='bicubic': must be one of lanczos, nearest"):
        Omniglot(str(omniglot_root), split="small2", image_size=6, resample="bicubic")


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
    groups = {s: int(images.groups.max()) + 1 for s, images in data.splits.items()}
    assert groups == {"train": 25, "val": 5, "test": 20}
    test = data.splits["test"]
    batch = data.sample(20, "test", torch.Generator().manual_seed(0))
    for task in batch:
        # Map each support image back to its class (exact pixel match) and check one alphabet per episode.
        flat = test.images.flatten(1).float() / 255
        rows = torch.cdist(task.support_x.flatten(1), flat).argmin(dim=1)
        alphabets = {test.class_names[int(test.labels[r])].split("/")[0] for r in rows}
        assert len(alphabets) == 1


def test_download_true_fetches_missing_archives(omniglot_root: Path, tmp_path: Path) -> None:
    """dataset.download=true fetches exactly the missing archives (the real small set, checksummed, from a
    file:// mirror here) and loads them; generated background and evaluation sets are already there."""
    root = make_fake_omniglot(tmp_path / "omniglot", archives=["background", "evaluation"], size=8)
    data = Omniglot(str(root), split="small1", download=True, mirror=omniglot_root.as_uri(), image_size=8,
                    k_query=1)
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_background_small1.zip",
                                                      "images_evaluation.zip"]
    assert data.splits["train"].num_classes == 136 and data.splits["val"].num_classes == 828


# Generated archives with every real character (two 6x6 drawings each): fast, and free to damage.

LAKE_VAL_ALPHABETS = {"Ojibwe_(Canadian_Aboriginal_Syllabics)", "Sanskrit", "Syriac_(Estrangelo)", "Tagalog",
                      "Tifinagh"}  # the last five background alphabets in sorted order, as docs/data.md says


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_omniglot(tmp_path_factory.mktemp("fake_omniglot"))


def fake(root: Path, **kwargs: object) -> Omniglot:
    settings: dict = {"image_size": 6, "k_shot": 1, "k_query": 1, **kwargs}
    return Omniglot(str(root), **settings)


def alphabets(names: list[str]) -> set[str]:
    return {name.split("/", 1)[0] for name in names}


@pytest.mark.parametrize("split", SCHEMES)
def test_no_character_is_in_two_splits(fake_root: Path, split: str) -> None:
    data = fake(fake_root, split=split)
    characters = {s: {name.rsplit("/rot", 1)[0] for name in images.class_names} for s, images in data.splits.items()}
    assert not characters["val"] & characters["test"], "validation must not choose checkpoints on test classes"
    assert not characters["train"] & characters["test"]
    if split == "vinyals_trainval":  # trains on the validation characters too, as Snell et al. did
        assert characters["val"] < characters["train"]
    else:
        assert not characters["train"] & characters["val"]
    if not split.startswith("vinyals"):  # the other schemes split by alphabet
        found = {s: alphabets(images.class_names) for s, images in data.splits.items()}
        assert not found["val"] & found["test"] and not found["train"] & (found["val"] | found["test"])


@pytest.mark.parametrize(("split", "classes"), [("lake", (813, 151, 659)), ("small1", (136, 828, 659)),
                                                ("small2", (156, 808, 659))])
def test_what_each_scheme_trains_validates_and_tests_on(fake_root: Path, split: str,
                                                        classes: tuple[int, int, int]) -> None:
    data = fake(fake_root, split=split)
    assert tuple(data.splits[s].num_classes for s in ("train", "val", "test")) == classes
    found = {s: alphabets(images.class_names) for s, images in data.splits.items()}
    background = set(BACKGROUND_ALPHABETS)
    assert found["test"] == alphabets(archive_characters("evaluation")) and len(found["test"]) == 20
    if split == "lake":
        assert found["val"] == LAKE_VAL_ALPHABETS and found["train"] == background - LAKE_VAL_ALPHABETS
    else:
        assert found["train"] == set(SMALL_ALPHABETS[split]) and found["val"] == background - found["train"]


@pytest.mark.parametrize(("split", "rotations", "train_classes"), [
    ("lake", [0, 90, 180, 270], 4 * 813), ("small1", [0, 180], 2 * 136), ("vinyals", [0], 1028),
    ("vinyals_trainval", [0, 90], 2 * 1200)])
def test_rotations_are_training_classes_of_their_own(fake_root: Path, split: str, rotations: list[int],
                                                     train_classes: int) -> None:
    """dataset.rotations: each listed rotation of each training character is a class (its drawings rotated,
    a rotated alphabet a group of its own); validation and test classes stay as the scheme has them."""
    data, default = fake(fake_root, split=split, rotations=rotations), fake(fake_root, split=split)
    train = data.splits["train"]
    assert train.num_classes == train_classes
    assert {int(name.rsplit("/rot", 1)[1]) for name in train.class_names} == set(rotations)
    characters = {name.rsplit("/rot", 1)[0] for name in train.class_names}
    assert characters == {name.rsplit("/rot", 1)[0] for name in default.splits["train"].class_names}
    assert int(train.groups.max()) + 1 == len(alphabets(train.class_names)) * len(rotations)
    for split_name in ("val", "test"):
        assert data.splits[split_name].class_names == default.splits[split_name].class_names
    name = sorted(characters)[0]
    first = train.class_names.index(f"{name}/rot000")
    drawings = train.images[train.labels == first]
    for r in rotations:
        turned = train.images[train.labels == train.class_names.index(f"{name}/rot{r:03d}")]
        assert torch.equal(turned, torch.rot90(drawings, r // 90, dims=(-2, -1)))


@pytest.mark.parametrize("rotations", [[45], [], [0, 0]])
def test_bad_rotations_are_named(fake_root: Path, rotations: list[int]) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(f"rotations={rotations!r}: must be distinct values among")):
        fake(fake_root, split="lake", rotations=rotations)


def test_download_true_fetches_the_background_set_for_the_small_schemes(
        fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[str] = []

    def fetch(name: str, root: Path, *, mirror: str | None, only: list[str]) -> list[Path]:
        requested.extend(only)
        for file in only:
            shutil.copy(fake_root / file, root / file)
        return [root / file for file in only]

    monkeypatch.setattr(omniglot_module, "fetch_dataset", fetch)
    fake(tmp_path, split="small2", download=True)
    assert sorted(requested) == ["images_background.zip", "images_background_small2.zip", "images_evaluation.zip"]


def rewrite(path: Path, write: Callable[[], object]) -> None:
    """Rewrite `path` (same size) and make sure its modification time changes, even on a coarse clock."""
    before = path.stat()
    write()
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


def test_a_changed_archive_of_the_same_size_is_decoded_anew(tmp_path: Path) -> None:
    root, cache = tmp_path / "omniglot", tmp_path / "cache"
    make_fake_omniglot(root, archives=["small1"])
    first, _ = load_archive(root, "small1", 6, cache)
    rewrite(root / "images_background_small1.zip", lambda: make_fake_omniglot(root, archives=["small1"], variant=1))
    second, _ = load_archive(root, "small1", 6, cache)
    assert not torch.equal(first, second) and torch.equal(second, load_archive(root, "small1", 6, None)[0])
    assert len(list(cache.glob("omniglot-small1-6px-*.pt"))) == 2


def test_a_changed_drawing_in_an_extracted_folder_is_decoded_anew(tmp_path: Path) -> None:
    make_fake_omniglot(tmp_path / "zips", archives=["small1"])
    with zipfile.ZipFile(tmp_path / "zips" / "images_background_small1.zip") as archive:
        archive.extractall(tmp_path / "omniglot")
    first, _ = load_archive(tmp_path / "omniglot", "small1", 6, tmp_path / "cache")
    drawing = sorted((tmp_path / "omniglot").glob("images_background_small1/*/*/*.png"))[0]
    index = int(drawing.name.split("_")[0])
    rewrite(drawing, lambda: drawing.write_bytes(png(index, 0, 6, variant=1)))
    second, _ = load_archive(tmp_path / "omniglot", "small1", 6, tmp_path / "cache")
    assert int(second[0, 0, 0, 0]) == 255 - drawing_value(index, 0, variant=1) != int(first[0, 0, 0, 0])


def test_an_unreadable_cache_is_decoded_anew(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_fake_omniglot(tmp_path, archives=["small2"])
    images, _ = load_archive(tmp_path, "small2", 6, tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("omniglot-small2-*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        again, _ = load_archive(tmp_path, "small2", 6, tmp_path / "cache")
    assert torch.equal(images, again)
    assert any(str(cache) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("damage", ["truncated", "bad member"])
def test_a_damaged_archive_is_one_line_that_says_to_fetch_it_again(tmp_path: Path, damage: str) -> None:
    root = make_fake_omniglot(tmp_path / "omniglot", archives=["background", "evaluation"])
    archive = root / "images_evaluation.zip"
    blob = bytearray(archive.read_bytes())
    if damage == "truncated":  # an interrupted copy
        del blob[len(blob) // 2:]
    else:  # a flipped byte inside the first drawing: the zip's CRC check fails
        start = blob.index(b"\x89PNG")
        blob[start + 40] ^= 0xFF
    archive.write_bytes(bytes(blob))
    with pytest.raises(ValueError) as raised:
        fake(root, split="lake")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"root={str(root)!r}: {archive} is not a readable zip archive (truncated or corrupt")
    assert message.endswith(f"delete it and fetch it again with `metalearn-data download omniglot --root {root}`")


def test_an_unreadable_drawing_in_an_extracted_folder_is_named(tmp_path: Path) -> None:
    make_fake_omniglot(tmp_path / "zips", archives=["small1"])
    with zipfile.ZipFile(tmp_path / "zips" / "images_background_small1.zip") as archive:
        archive.extractall(tmp_path / "omniglot")
    drawing = sorted((tmp_path / "omniglot").glob("images_background_small1/*/*/*.png"))[3]
    drawing.write_bytes(drawing.read_bytes()[:30])
    with pytest.raises(ValueError, match=rf"^root='.*': {drawing} is not a readable PNG drawing \(truncated or "
                                         r"corrupt.*\): delete .*images_background_small1 and extract or fetch it "
                                         r"again"):
        load_archive(tmp_path / "omniglot", "small1", 6, None)


def test_an_archive_without_drawings_is_named(tmp_path: Path) -> None:
    (tmp_path / "images_background_small2").mkdir()  # e.g. an extraction that never finished
    with pytest.raises(ValueError, match=rf"^root='{tmp_path}': {tmp_path / 'images_background_small2'} holds no "
                                         r"drawings \(<alphabet>/<character>/\*\.png\)"):
        load_archive(tmp_path, "small2", 6, None)


def test_lake_names_a_missing_validation_alphabet(tmp_path: Path) -> None:
    make_fake_omniglot(tmp_path / "zips", archives=["background", "evaluation"])
    with zipfile.ZipFile(tmp_path / "zips" / "images_background.zip") as archive:
        archive.extractall(tmp_path / "omniglot")
    shutil.copy(tmp_path / "zips" / "images_evaluation.zip", tmp_path / "omniglot")
    shutil.rmtree(tmp_path / "omniglot" / "images_background" / "Tifinagh")
    with pytest.raises(ValueError, match=r"^root='.*omniglot': the background set lacks the alphabet Tifinagh, "
                                         r"which split=lake validates on"):
        fake(tmp_path / "omniglot", split="lake")
