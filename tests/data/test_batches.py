"""Tests of the non-episodic training batches: image pairs (half same-class, distinct images, the
other class uniform and within the group when asked), labelled minibatches, their augmentation,
and `drawer`, through which a learner that trains on them draws them."""

from __future__ import annotations

import pytest
import torch

from metalearn.data.augment import Augment
from metalearn.data.batches import draw_labeled, draw_pairs
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.images import ClassImages
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.tasks import LabeledBatch, PairBatch, drawer

# 6 classes with 2..4 images each; groups {0, 1, 2}, {3, 4}, {5}. Pixel value = image index, so the
# index (and class) of every drawn image can be read back.
COUNTS = [3, 2, 4, 2, 3, 2]
GROUPS = torch.tensor([0, 0, 0, 1, 1, 2])


def collection() -> ClassImages:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return ClassImages(images, labels, [f"c{c}" for c in range(len(COUNTS))], GROUPS)


def class_of(index: torch.Tensor) -> torch.Tensor:
    return collection().labels[index]


def test_pairs_are_half_same_class_with_distinct_images() -> None:
    data = collection()
    first, second, same = draw_pairs(data, 4000, torch.Generator().manual_seed(0))
    assert same.dtype == torch.float32 and same.sum().item() == 2000
    is_same = same.bool()
    assert torch.equal(class_of(first)[is_same], class_of(second)[is_same])
    assert bool((first[is_same] != second[is_same]).all())  # two different images of the class
    assert bool((class_of(first)[~is_same] != class_of(second)[~is_same]).all())
    # Every class appears as the first class and as the other class; every ordered pair of distinct
    # classes occurs among the negatives (the other class is uniform among the rest).
    pairs = set(zip(class_of(first)[~is_same].tolist(), class_of(second)[~is_same].tolist()))
    assert pairs == {(a, b) for a in range(6) for b in range(6) if a != b}
    # The other class is uniform among the other five: 2000 negatives, each class 400 as "other" on average.
    counts = torch.bincount(class_of(second)[~is_same], minlength=6).float()
    assert counts.min() > 300 and counts.max() < 500


def test_pairs_within_group_stay_in_the_group() -> None:
    data = collection()
    first, second, same = draw_pairs(data, 2000, torch.Generator().manual_seed(1), within_group=True)
    a, b = class_of(first), class_of(second)
    assert bool((GROUPS[a] == GROUPS[b]).all())
    assert not bool((a == 5).any())  # class 5 is alone in its group: no negative for it exists
    negatives = set(zip(a[same == 0].tolist(), b[same == 0].tolist()))
    assert negatives == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (3, 4), (4, 3)}


def test_pairs_are_reproducible_and_need_two_images() -> None:
    data = collection()
    draws = [draw_pairs(data, 50, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*draws))
    single = ClassImages(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="no class has two images"):
        draw_pairs(single, 4, torch.Generator())


def test_labeled_batches_cover_all_images_with_their_classes() -> None:
    data = collection()
    index, labels = draw_labeled(data, 3000, torch.Generator().manual_seed(0))
    assert torch.equal(labels, class_of(index))
    seen = torch.bincount(index, minlength=len(data)).float()
    assert seen.min() > 150  # 16 images, 3000 draws: about 187 each


def sampler(augment: Augment | None = None) -> EpisodeSampler:
    data = collection()
    return EpisodeSampler({"train": data, "val": data, "test": data}, n_way=2, k_shot=1, k_query=1, augment=augment)


def test_sampler_methods_return_float_images_and_targets() -> None:
    tasks = sampler()
    pairs = tasks.sample_pairs(6, "train", torch.Generator().manual_seed(0))
    assert isinstance(pairs, PairBatch) and len(pairs) == 6 and pairs.x1.shape == (6, 1, 2, 2)
    first = (pairs.x1[:, 0, 0, 0] * 255).round().long()
    second = (pairs.x2[:, 0, 0, 0] * 255).round().long()
    assert torch.equal(class_of(first) == class_of(second), pairs.same.bool())
    labeled = tasks.sample_labeled(5, "val", torch.Generator().manual_seed(0))
    assert isinstance(labeled, LabeledBatch) and labeled.x.dtype == torch.float32
    assert torch.equal(class_of((labeled.x[:, 0, 0, 0] * 255).round().long()), labeled.y)
    assert tasks.num_classes("train") == 6
    with pytest.raises(ValueError, match="split='extra'"):
        tasks.sample_pairs(2, "extra", torch.Generator())  # type: ignore[arg-type]


def test_training_pairs_are_augmented_evaluation_never() -> None:
    flip = Augment(flip=True)
    data = collection()
    images = torch.rand(16, 1, 3, 3)
    data.images = (images * 255).to(torch.uint8)
    tasks = EpisodeSampler({"train": data, "val": data, "test": data}, 2, 1, 1, augment=flip)
    train = tasks.sample_labeled(400, "train", torch.Generator().manual_seed(0))
    plain = data.images.float().div(255)
    index, _ = draw_labeled(data, 400, torch.Generator().manual_seed(0))  # the same draw as the batch's
    mirrored = sum(not torch.allclose(x, plain[i]) for x, i in zip(train.x, index))
    assert 120 < mirrored < 280  # about half flipped
    val = tasks.sample_labeled(50, "val", torch.Generator().manual_seed(0))
    index, _ = draw_labeled(data, 50, torch.Generator().manual_seed(0))
    torch.testing.assert_close(val.x, plain[index])


def test_drawer_finds_a_family_s_way_of_drawing_or_says_it_has_none() -> None:
    tasks = sampler()
    assert isinstance(drawer(tasks, "sample_pairs", "pairs")(4, "train", torch.Generator()), PairBatch)
    assert isinstance(drawer(tasks, "sample_labeled", "labelled minibatches")(3, "train", torch.Generator()),
                      LabeledBatch)
    with pytest.raises(ValueError, match="trains on pairs of examples .* cannot draw: it needs a dataset of classes"):
        drawer(SinusoidTasks(), "sample_pairs", "pairs")
