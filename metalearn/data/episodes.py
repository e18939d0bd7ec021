"""N-way K-shot episodes over any class-indexed image collection.

Images are held as one uint8 tensor per split, grouped by class, and episodes are drawn for a whole
meta-batch at once with tensor operations, so sampling costs microseconds per episode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from matplotlib.figure import Figure
from torch import Tensor

from metalearn.checks import positive_int
from metalearn.data.augment import Augment
from metalearn.data.batches import draw_labeled, draw_pairs
from metalearn.data.images import ClassImages
from metalearn.objectives import Classification
from metalearn.tasks import SPLITS, LabeledBatch, PairBatch, Split, Task, TaskBatch


def _ways(name: str, value: int) -> int:
    """Return `value` if it is an integer >= 2, else raise ValueError naming it: a 1-way episode has one
    possible answer, so its accuracy is always 100% and says nothing."""
    if positive_int(name, value) < 2:
        raise ValueError(f"{name}={value!r}: classification needs at least 2 ways (a 1-way episode is always "
                         f"answered right)")
    return value


class EpisodeSampler:
    """Draws N-way K-shot Q-query classification episodes from per-split image collections.

    Classes within an episode are distinct, images within a class are distinct, and support and
    query never share an image. Labels are 0..N-1 in the episode's (random) class order. Training
    episodes may use a different way/shot/query than evaluation episodes (ProtoNet trains 60-way).

    Args:
        splits: the image collection of each split.
        n_way, k_shot, k_query: the evaluation (and default training) episode shape.
        train_n_way, train_k_shot, train_k_query: training episode shape, when it differs.
        within_group: draw all classes of an episode from one group (e.g. one Omniglot alphabet).
        channels: image channels the configuration expects (models size their input from it); checked
            against the images, None: not checked.
        augment: random augmentation of training episodes (support and query images alike, each image
            its own draw, from the episode's generator); validation and test episodes are never
            augmented. None: no augmentation.
    """

    def __init__(
        self, splits: Mapping[Split, ClassImages], n_way: int, k_shot: int, k_query: int,
        train_n_way: int | None = None, train_k_shot: int | None = None, train_k_query: int | None = None,
        within_group: bool = False, channels: int | None = None, augment: Augment | None = None,
    ) -> None:
        evaluation = (_ways("n_way", n_way), positive_int("k_shot", k_shot), positive_int("k_query", k_query))
        training = (
            _ways("train_n_way", train_n_way) if train_n_way is not None else n_way,
            positive_int("train_k_shot", train_k_shot) if train_k_shot is not None else k_shot,
            positive_int("train_k_query", train_k_query) if train_k_query is not None else k_query,
        )
        self.splits = dict(splits)
        self.shapes: dict[Split, tuple[int, int, int]] = {s: training if s == "train" else evaluation for s in SPLITS}
        self.n_way, self.k_shot, self.k_query = evaluation
        self.objective = Classification()
        self.within_group = within_group
        self.augment = augment if augment is not None and augment.active else None
        for split, images in self.splits.items():
            self._check_fits(split, images)
        first = next(iter(self.splits.values()))
        self.input_shape = first.image_shape
        if channels is not None and channels != self.input_shape[0]:
            raise ValueError(f"channels={channels!r}: the images of this dataset have {self.input_shape[0]} channel(s)")

    @property
    def output_size(self) -> int:
        """Classes per episode (training and evaluation way must agree for a fixed-size head)."""
        return self.n_way

    def _check_fits(self, split: Split, images: ClassImages) -> None:
        way, shot, query = self.shapes[split]
        prefix = "train_" if split == "train" and self.shapes["train"] != self.shapes["val"] else ""
        if way > images.num_classes:
            raise ValueError(f"{prefix}n_way={way}: the {split} split has only {images.num_classes} classes")
        if self.within_group and int(torch.bincount(images.groups).max()) < way:
            raise ValueError(f"{prefix}n_way={way}: no group of the {split} split has that many classes")
        smallest = int(images.counts.min())
        if shot + query > smallest:
            raise ValueError(f"{prefix}k_query={query}: with {prefix}k_shot={shot} an episode needs {shot + query} "
                             f"images per class; the {split} split has classes with only {smallest} images")

    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> TaskBatch:
        """Draw `batch_size` episodes from `split` using only `generator`."""
        data = self._split(split)
        way, shot, query = self.shapes[split]
        per_class = shot + query
        # Distinct classes per episode: the first `way` of a random permutation (via random keys).
        class_keys = torch.rand(batch_size, data.num_classes, generator=generator)
        if self.within_group:  # one group per episode, uniformly among the groups with enough classes
            sizes = torch.bincount(data.groups).to(torch.float32)
            chosen = torch.multinomial((sizes >= way).to(torch.float32), batch_size, replacement=True,
                                       generator=generator)
            class_keys[data.groups.unsqueeze(0) != chosen.unsqueeze(1)] = -1.0
        classes = class_keys.topk(way, dim=1).indices  # [B, way]
        # Distinct images per class: random keys, padding positions past the class size last.
        counts = data.counts[classes]  # [B, way]
        width = int(counts.max())
        image_keys = torch.rand(batch_size, way, width, generator=generator)
        image_keys[torch.arange(width) >= counts.unsqueeze(-1)] = -1.0
        picks = image_keys.topk(per_class, dim=-1).indices  # [B, way, K+Q]
        index = data.offsets[classes].unsqueeze(-1) + picks
        images = self._images(data, index, split, generator)  # [B, way, K+Q, C, H, W]
        labels = torch.arange(way).view(1, way, 1).expand(batch_size, way, per_class)
        support_x = images[:, :, :shot].reshape(batch_size, way * shot, *data.image_shape)
        query_x = images[:, :, shot:].reshape(batch_size, way * query, *data.image_shape)
        support_y = labels[:, :, :shot].reshape(batch_size, way * shot)
        query_y = labels[:, :, shot:].reshape(batch_size, way * query)
        return TaskBatch(support_x, support_y, query_x, query_y)

    def _split(self, split: Split) -> ClassImages:
        if split not in self.splits:
            raise ValueError(f"split={split!r}: this dataset has splits {', '.join(self.splits)}")
        return self.splits[split]

    def _images(self, data: ClassImages, index: Tensor, split: Split, generator: torch.Generator) -> Tensor:
        """The images at `index` as floats in [0, 1], augmented if `split` is train."""
        images = data.images[index].to(torch.float32).div_(255.0)
        if self.augment is not None and split == "train":
            images = self.augment(images, generator)
        return images

    def num_classes(self, split: Split) -> int:
        """Classes of `split` (the label range of `sample_labeled`)."""
        return self._split(split).num_classes

    def sample_pairs(self, n: int, split: Split, generator: torch.Generator) -> PairBatch:
        """`n` image pairs of `split`, half of them of one class (see `draw_pairs`; pairs are drawn
        within a group when `within_group` is set); training pairs are augmented like episodes."""
        data = self._split(split)
        first, second, same = draw_pairs(data, n, generator, self.within_group)
        both = self._images(data, torch.stack([first, second], 1), split, generator)
        return PairBatch(both[:, 0], both[:, 1], same)

    def sample_labeled(self, n: int, split: Split, generator: torch.Generator) -> LabeledBatch:
        """`n` images of `split` drawn uniformly with their class in 0..num_classes(split)-1;
        training images are augmented like episodes."""
        data = self._split(split)
        index, labels = draw_labeled(data, n, generator)
        return LabeledBatch(self._images(data, index, split, generator), labels)

    def illustrate(self, predict: Callable[[Task, Tensor], tuple[Tensor, Tensor]], generator: torch.Generator,
                   per_class: int = 3) -> Figure:
        """One test episode: the support images of each class (top row), then query images titled with
        the class predicted before -> after adaptation, green when the adapted prediction is right."""
        task = self.sample(1, "test", generator)[0]
        before, after = (p.argmax(dim=-1).cpu() for p in predict(task, task.query_x))
        rows = 1 + min(per_class, self.k_query)
        figure = Figure(figsize=(1.6 * self.n_way, 1.7 * rows), layout="constrained")
        axes = figure.subplots(rows, self.n_way, squeeze=False)
        for c in range(self.n_way):
            shown = [(task.support_x[task.support_y == c][0], f"support {c}", "black")]
            for i in torch.nonzero(task.query_y == c).flatten()[: rows - 1].tolist():
                colour = "tab:green" if int(after[i]) == c else "tab:red"
                shown.append((task.query_x[i], f"{int(before[i])} -> {int(after[i])}", colour))
            for r, (image, title, colour) in enumerate(shown):
                pixels = image.permute(1, 2, 0).cpu().numpy()
                axes[r, c].imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap="gray")
                axes[r, c].set_title(title, color=colour, fontsize="small")
        for ax in axes.flat:
            ax.axis("off")
        figure.suptitle("query: predicted class before -> after adaptation")
        return figure
