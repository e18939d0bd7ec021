"""Episode sampler over generated class-indexed images: distinctness, determinism, shapes, errors."""

from __future__ import annotations

import pytest
import torch

from metalearn.data.episodes import EpisodeSampler
from metalearn.data.images import ClassImages


def make_classes(counts: list[int], size: int = 4) -> ClassImages:
    """Class c holds counts[c] images; every image is unique: pixel (0,0) = class, (0,1) = index."""
    images, labels = [], []
    for c, n in enumerate(counts):
        block = torch.zeros(n, 1, size, size, dtype=torch.uint8)
        block[:, 0, 0, 0] = c
        block[:, 0, 0, 1] = torch.arange(n, dtype=torch.uint8)
        images.append(block)
        labels.append(torch.full((n,), c))
    # Interleave so that ClassImages has to sort by class itself.
    order = torch.randperm(sum(counts), generator=torch.Generator().manual_seed(0))
    return ClassImages(torch.cat(images)[order], torch.cat(labels)[order], [f"class{c}" for c in range(len(counts))])


def identities(x: torch.Tensor) -> torch.Tensor:
    """(class, index) of each image in a [..., 1, H, W] float batch."""
    pixels = (x[..., 0, 0, :2] * 255).round().long()
    return pixels[..., 0] * 1000 + pixels[..., 1]


def sampler(**kwargs: int) -> EpisodeSampler:
    splits = {"train": make_classes([7] * 12), "val": make_classes([5, 9, 6, 8, 20]), "test": make_classes([6] * 6)}
    return EpisodeSampler(splits, **{"n_way": 3, "k_shot": 2, "k_query": 3, **kwargs})


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_episodes_are_distinct_and_consistently_labelled(split: str) -> None:
    batch = sampler().sample(50, split, torch.Generator().manual_seed(1))
    assert batch.support_x.shape == (50, 6, 1, 4, 4) and batch.query_x.shape == (50, 9, 1, 4, 4)
    for task in batch:
        support, query = identities(task.support_x), identities(task.query_x)
        assert len(set(support.tolist()) | set(query.tolist())) == 15, "an image was repeated"
        classes = {}
        labels = torch.cat([task.support_y, task.query_y]).tolist()
        for ident, label in zip(torch.cat([support, query]).tolist(), labels):
            classes.setdefault(label, set()).add(ident // 1000)
        assert sorted(classes) == [0, 1, 2] and all(len(c) == 1 for c in classes.values())
        assert len({next(iter(c)) for c in classes.values()}) == 3, "a class was repeated"
        assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2]


def test_sampling_covers_all_classes_and_images_of_uneven_classes() -> None:
    batch = sampler(n_way=2, k_shot=1, k_query=4).sample(2000, "val", torch.Generator().manual_seed(2))
    seen = set(identities(batch.support_x).flatten().tolist()) | set(identities(batch.query_x).flatten().tolist())
    assert seen == {c * 1000 + i for c, n in enumerate([5, 9, 6, 8, 20]) for i in range(n)}


def test_same_seed_same_episodes() -> None:
    a = sampler().sample(4, "train", torch.Generator().manual_seed(3))
    b = sampler().sample(4, "train", torch.Generator().manual_seed(3))
    c = sampler().sample(4, "train", torch.Generator().manual_seed(4))
    assert torch.equal(a.query_x, b.query_x) and not torch.equal(a.query_x, c.query_x)


def test_training_shape_may_differ_from_evaluation() -> None:
    s = sampler(train_n_way=6, train_k_shot=1, train_k_query=2)
    train = s.sample(2, "train", torch.Generator())
    test = s.sample(2, "test", torch.Generator())
    assert train.support_y.shape == (2, 6) and train.query_y.shape == (2, 12)
    assert test.support_y.shape == (2, 6) and test.query_y.shape == (2, 9)
    assert s.output_size == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_way": 6}, "n_way=6: the val split has only 5 classes"),
    ({"k_shot": 4, "k_query": 3}, "k_query=3: with k_shot=4 an episode needs 7 images per class; the val split has "
                                  "classes with only 5 images"),
    ({"train_n_way": 13}, "train_n_way=13: the train split has only 12 classes"),
    ({"k_shot": 0}, "k_shot=0"),
])
def test_impossible_episodes_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sampler(**kwargs)


def test_class_images_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ClassImages(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="one entry per image"):
        ClassImages(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), ["a"])


def test_illustration_shows_support_and_query_predictions() -> None:
    s = sampler()
    seen: list[int] = []

    def predict(task, x):  # type: ignore[no-untyped-def]
        seen.append(len(x))
        logits = torch.zeros(len(x), 3)
        logits[:, 1] = 1.0  # always predicts class 1
        return torch.zeros(len(x), 3), logits

    figure = s.illustrate(predict, torch.Generator().manual_seed(0))
    axes = figure.axes
    assert seen == [9] and len(axes) == 4 * 3
    titles = [ax.get_title() for ax in axes]
    assert titles[:3] == ["support 0", "support 1", "support 2"]
    assert titles[3:6] == ["0 -> 1"] * 3
    assert axes[4].title.get_color() == "tab:green" and axes[3].title.get_color() == "tab:red"


def test_within_group_episodes_stay_in_one_group() -> None:
    groups = torch.tensor([0] * 4 + [1] * 5 + [2] * 2 + [3])  # groups 2 and 3 are too small for 3-way
    data = make_classes([6] * 12)
    data = ClassImages(data.images, data.labels, data.class_names, groups)
    s = EpisodeSampler({"train": data}, n_way=3, k_shot=1, k_query=1, within_group=True)
    batch = s.sample(400, "train", torch.Generator().manual_seed(0))
    used = set()
    for task in batch:
        episode_groups = {int(groups[i // 1000]) for i in identities(task.support_x).tolist()}
        assert len(episode_groups) == 1
        used |= episode_groups
    assert used == {0, 1}
    with pytest.raises(ValueError, match="n_way=6: no group"):
        EpisodeSampler({"train": data}, n_way=6, k_shot=1, k_query=1, within_group=True)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_way": 1}, r"^n_way=1: classification needs at least 2 ways"),
    ({"train_n_way": 1}, r"^train_n_way=1: classification needs at least 2 ways"),
    ({"n_way": 1, "train_n_way": 5}, r"^n_way=1: "),
])
def test_one_way_episodes_are_rejected(kwargs: dict, message: str) -> None:
    """A 1-way episode has one possible answer, so its accuracy is always 100% and means nothing."""
    with pytest.raises(ValueError, match=message):
        sampler(**kwargs)
