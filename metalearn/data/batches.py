"""Non-episodic training batches over a class-indexed image collection, beside the episode sampler:
pairs of images for verification training (Siamese networks) and labelled minibatches of all
classes (pre-training of the fine-tuning baselines). Both are drawn for a whole batch at once with
tensor operations, from an explicit generator, like episodes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metalearn.data.images import ClassImages


def _below(bound: Tensor, generator: torch.Generator) -> Tensor:
    """A uniform random integer in [0, bound) for each entry of the integer tensor `bound` (>= 1)."""
    return (torch.rand(bound.shape, generator=generator) * bound).long().clamp_max(bound - 1)


def draw_pairs(data: ClassImages, n: int, generator: torch.Generator,
               within_group: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Image indices of `n` pairs and whether each pair is of one class, half of them same-class.

    Pair i is same-class for even i. A same-class pair is two distinct images of a class drawn
    uniformly among the classes; a different-class pair is an image of that class and one of another
    class drawn uniformly among the others (of the same group if `within_group`, e.g. another
    character of the alphabet, which makes the negatives harder).

    Returns:
        (first, second, same): image indices into `data.images` [n] twice, and a float tensor [n]
        with 1.0 for same-class pairs.
    """
    same = torch.arange(n) % 2 == 0
    if within_group:
        group_sizes = torch.bincount(data.groups, minlength=int(data.groups.max()) + 1)
        eligible = group_sizes[data.groups] >= 2  # classes that have another class in their group
    else:
        eligible = torch.ones(data.num_classes, dtype=torch.bool)
    eligible &= data.counts >= 2  # classes with two distinct images for a same-class pair
    if not bool(eligible.any()) or data.num_classes < 2:
        raise ValueError("no class has two images" + (" and another class in its group" if within_group else "")
                         + ": cannot draw pairs")
    candidates = torch.nonzero(eligible).flatten()
    a = candidates[_below(torch.full((n,), len(candidates)), generator)]
    # The other class: uniform among the classes other than `a` (within a's group if asked), through
    # a's rank in a list of classes ordered by group.
    if within_group:
        order = torch.argsort(data.groups, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        sizes = torch.bincount(data.groups, minlength=int(data.groups.max()) + 1)
        starts = torch.cumsum(sizes, 0) - sizes
        g = data.groups[a]
        local = rank[a] - starts[g]
        b = order[starts[g] + (local + 1 + _below(sizes[g] - 1, generator)) % sizes[g]]
    else:
        b = (a + 1 + _below(torch.full((n,), data.num_classes - 1), generator)) % data.num_classes
    first_pick = _below(data.counts[a], generator)
    # Same class: another image of `a` (distinct from the first); different: any image of `b`.
    other_of_a = (first_pick + 1 + _below((data.counts[a] - 1).clamp_min(1), generator)) % data.counts[a]
    second_class = torch.where(same, a, b)
    second_pick = torch.where(same, other_of_a, _below(data.counts[b], generator))
    return data.offsets[a] + first_pick, data.offsets[second_class] + second_pick, same.to(torch.float32)


def draw_labeled(data: ClassImages, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices of `n` images drawn uniformly (with replacement) from all images, and their classes.

    Sampling with replacement makes every batch independent of the step, so a resumed run draws the
    same batches as an uninterrupted one; over an epoch's worth of steps each image is seen once on
    average.
    """
    index = torch.randint(len(data), (n,), generator=generator)
    return index, data.labels[index]
