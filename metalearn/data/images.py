"""A class-indexed image collection: the common input of the episode sampler and the non-episodic
training batches (metalearn.data.episodes, metalearn.data.batches)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ClassImages:
    """Images of many classes: a uint8 tensor [N, C, H, W] with an integer class label per image.

    Args:
        images: uint8 images.
        labels: class index of each image, in [0, len(class_names)).
        class_names: a name per class (e.g. `Alphabet/character01/rot090`).
        groups: optional group index per class (e.g. Omniglot's alphabet), for within-group episodes.
    """

    def __init__(self, images: Tensor, labels: Tensor, class_names: Sequence[str],
                 groups: Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have one entry per image, got {tuple(labels.shape)}")
        order = torch.argsort(labels, stable=True)
        self.images = images[order].contiguous()
        self.labels = labels[order]
        self.class_names = list(class_names)
        self.counts = torch.bincount(self.labels, minlength=len(self.class_names))
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.groups = groups if groups is not None else torch.zeros(len(self.class_names), dtype=torch.int64)
        if self.groups.shape != (len(self.class_names),):
            raise ValueError(f"groups must have one entry per class, got {tuple(self.groups.shape)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return self.images.shape[0]
