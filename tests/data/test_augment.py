"""Augmentation: the geometry of each transform against hand-made images, randomness from the
generator only, training episodes augmented and evaluation episodes untouched, configs that compose."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from metalearn.data.augment import Augment, affine_matrices, warp
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.images import ClassImages
from tests.conftest import Composer

SIZE = 16


def _dot(row: int, col: int, size: int = SIZE) -> torch.Tensor:
    image = torch.zeros(1, 1, size, size)
    image[0, 0, row, col] = 1.0
    return image


def _move(image: torch.Tensor, angle: float = 0.0, shear: tuple[float, float] = (0.0, 0.0), zoom: float = 1.0,
          shift: tuple[float, float] = (0.0, 0.0), mirror: bool = False, padding_mode: str = "zeros") -> torch.Tensor:
    theta = affine_matrices(torch.tensor([angle]), torch.tensor([shear]), torch.tensor([zoom]),
                            torch.tensor([shift]), torch.tensor([mirror]), image.shape[-2], image.shape[-1])
    return warp(image, theta, padding_mode)


def test_shift_moves_content_right_and_down() -> None:
    moved = _move(_dot(5, 5), shift=(3.0, -2.0))
    torch.testing.assert_close(moved, _dot(3, 8), atol=1e-5, rtol=0)


def test_mirror_flips_columns() -> None:
    image = torch.rand(1, 3, SIZE, SIZE)
    torch.testing.assert_close(_move(image, mirror=True), image.flip(-1), atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_is_clockwise_and_exact() -> None:
    image = torch.rand(1, 1, SIZE, SIZE)
    # Clockwise by a quarter turn: the top row becomes the right-hand column.
    torch.testing.assert_close(_move(image, angle=90.0), image.rot90(-1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(_move(_dot(2, 8), angle=90.0), _dot(8, 13), atol=1e-5, rtol=0)


def test_zoom_enlarges_about_the_centre() -> None:
    image = torch.zeros(1, 1, SIZE, SIZE)
    image[..., 6:10, 6:10] = 1.0  # a centred 4x4 square
    zoomed = _move(image, zoom=2.0)
    assert zoomed.sum().item() == pytest.approx(4 * image.sum().item(), rel=0.05)
    centre = (zoomed[0, 0] > 0.5).nonzero().float().mean(0)
    torch.testing.assert_close(centre, torch.tensor([7.5, 7.5]))


def test_shear_slants_a_vertical_line() -> None:
    image = torch.zeros(1, 1, 15, 15)  # odd size: pixel centres at integer offsets from the centre
    image[..., :, 7] = 1.0
    sheared = _move(image, shear=(1.0, 0.0))  # x' = x + y: the centre column becomes the diagonal
    torch.testing.assert_close(sheared[0, 0], torch.eye(15), atol=1e-5, rtol=0)


def test_non_square_images_keep_their_proportions() -> None:
    image = torch.zeros(1, 1, 8, 16)
    image[0, 0, 1, 8] = 1.0  # (x, y) = (0.5, -2.5) from the centre (7.5, 3.5)
    expected = torch.zeros(1, 1, 8, 16)
    expected[0, 0, 4, 10] = 1.0  # a quarter turn clockwise: (2.5, 0.5)
    torch.testing.assert_close(_move(image, angle=90.0), expected, atol=1e-5, rtol=0)


def test_defaults_are_the_identity() -> None:
    augment = Augment()
    images = torch.rand(2, 5, 1, SIZE, SIZE)
    assert not augment.active
    assert augment(images, torch.Generator().manual_seed(0)) is images
    assert not Augment(degrees=30.0, p=0.0).active


def test_flip_mirrors_about_half_the_images() -> None:
    images = torch.rand(400, 3, 8, 8)
    out = Augment(flip=True)(images, torch.Generator().manual_seed(0))
    same = (out - images).abs().flatten(1).amax(1) < 1e-5
    mirrored = (out - images.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert (same ^ mirrored).all()
    assert 150 < int(mirrored.sum()) < 250


def test_crop_is_an_integer_shift_within_the_padding() -> None:
    padding = 2
    images = torch.rand(200, 1, 10, 10) + 1.0  # never 0, so the zero-filled border shows the shift
    out = Augment(crop_padding=padding)(images, torch.Generator().manual_seed(0))
    seen = set()
    for image, cropped in zip(images, out):
        matches = []
        for dy in range(-padding, padding + 1):
            for dx in range(-padding, padding + 1):
                padded = torch.nn.functional.pad(image, (padding,) * 4)
                window = padded[:, padding - dy: padding - dy + 10, padding - dx: padding - dx + 10]
                if torch.allclose(cropped, window, atol=1e-5):
                    matches.append((dx, dy))
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == (2 * padding + 1) ** 2  # every shift occurs


def test_affine_stays_within_its_ranges() -> None:
    augment = Augment(degrees=10.0, shear=0.3, scale=(0.8, 1.2), translate=2.0, p=0.5)
    theta = augment.matrices(2000, SIZE, SIZE, torch.Generator().manual_seed(0))
    forward = torch.linalg.inv(theta[:, :, :2])
    shift = -(forward @ theta[:, :, 2:]).squeeze(-1) * SIZE / 2  # back to pixels
    assert shift.abs().max() <= 2.0 + 1e-4
    assert (shift.abs().amax(1) < 1e-6).float().mean().item() == pytest.approx(0.5, abs=0.05)
    det = torch.linalg.det(forward)  # zoom² · (1 - shear_x · shear_y)
    assert det.min() >= 0.8**2 * (1 - 0.09) - 1e-4 and det.max() <= 1.2**2 * 1.09 + 1e-4
    assert (det - 1).abs().lt(1e-6).any() and not (det - 1).abs().lt(1e-6).all()


def test_randomness_comes_from_the_generator_only() -> None:
    augment = Augment(degrees=10.0, translate=2.0, flip=True)
    images = torch.rand(8, 1, SIZE, SIZE)
    torch.manual_seed(1)
    first = augment(images, torch.Generator().manual_seed(3))
    torch.manual_seed(2)
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"degrees": -1.0}, "augment.degrees=-1.0"),
    ({"scale": (1.2, 0.8)}, "augment.scale="),
    ({"scale": (0.0, 1.0)}, "augment.scale="),
    ({"p": 1.5}, "augment.p=1.5"),
    ({"crop_padding": 1.5}, "augment.crop_padding=1.5"),
    ({"padding_mode": "wrap"}, "augment.padding_mode='wrap'"),
])
def test_bad_settings_name_the_key(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Augment(**kwargs)  # type: ignore[arg-type]


def _sampler(augment: Augment | None) -> EpisodeSampler:
    images = (torch.arange(12 * 6 * SIZE * SIZE) % 251).to(torch.uint8).view(72, 1, SIZE, SIZE)
    data = ClassImages(images, torch.arange(72) // 6, [f"c{i}" for i in range(12)])
    return EpisodeSampler({"train": data, "val": data, "test": data}, n_way=3, k_shot=2, k_query=2, augment=augment)


def test_only_training_episodes_are_augmented() -> None:
    plain, augmented = _sampler(None), _sampler(Augment(degrees=20.0, flip=True))
    for split in ("val", "test"):
        a = plain.sample(4, split, torch.Generator().manual_seed(0))
        b = augmented.sample(4, split, torch.Generator().manual_seed(0))
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    a = plain.sample(4, "train", torch.Generator().manual_seed(0))
    b = augmented.sample(4, "train", torch.Generator().manual_seed(0))
    c = augmented.sample(4, "train", torch.Generator().manual_seed(0))
    assert torch.equal(a.support_y, b.support_y) and torch.equal(a.query_y, b.query_y)
    assert not torch.allclose(a.support_x, b.support_x) and not torch.allclose(a.query_x, b.query_x)
    assert torch.equal(b.support_x, c.support_x) and torch.equal(b.query_x, c.query_x)  # reproducible
    assert b.support_x.shape == a.support_x.shape and b.support_x.dtype == torch.float32


@pytest.mark.parametrize("option", ["none", "affine", "flip_crop"])
def test_augment_options_compose_and_reach_the_sampler(option: str, compose_cfg: Composer) -> None:
    cfg = compose_cfg("dataset=cifarfs", "model=conv4", f"dataset/augment={option}")
    tasks = instantiate(cfg.dataset)
    if option == "none":
        assert tasks.augment is None
    else:
        assert isinstance(tasks.augment, Augment) and tasks.augment.active
        assert tasks.augment.flip == (option == "flip_crop")
        assert tasks.augment.degrees == (10.0 if option == "affine" else 0.0)
    batch = tasks.sample(2, "train", torch.Generator().manual_seed(0))
    assert batch.support_x.shape[2:] == (3, cfg.dataset.image_size, cfg.dataset.image_size)
