"""Relation Networks: a learned relation module scores each (class, query) pair of feature maps.

The model is an embedding network that keeps feature maps (Conv-4 with `pool_blocks=2, flatten=False`
is the paper's). Adapting to a task sums each class's support feature maps (k-shot: the element-wise sum,
as in the paper). A query's score for class k is the relation module applied to the channel-wise
concatenation [class k's map; the query's map]: two blocks of 3x3 convolution, normalisation, ReLU
and 2x2 max-pooling, then a linear layer, ReLU, a linear layer to one number and a sigmoid, so scores
lie in (0, 1). Meta-training regresses the scores on the one-hot labels with the mean squared error
(the paper's loss), backpropagating into both the relation module and the embedding.

Sizes. The relation module belongs to the algorithm and is created in `setup(tasks)` from the feature-map
shape the model gives. Its convolutions are padded (the paper pads them on Omniglot, not on
mini-ImageNet), and a block max-pools only while both sides of its map are at least 2, so no map shrinks
below 1x1. With our Conv-4 (padded convolutions): Omniglot 28x28 -> 64x7x7 maps -> 3x3 -> 1x1, a 64-input
linear layer (the paper's 5x5 maps also end at 1x1); mini-ImageNet 84x84 -> 21x21 -> 10x10 -> 5x5, a
1,600-input layer (the paper's unpadded 19x19 maps end at 3x3). A flat embedding [d] is read as a d x 1 x 1
map (no pooling), so any model works.

"Before adaptation" metrics: the chance-level accuracy is the base's (argmax of equal scores); the
chance-level loss is the one of the MSE-optimal constant score 1/N, (N - 1) / N^2 per query, not the
base's cross-entropy log N, so that meta_loss and meta_loss_pre measure the same thing.

References:
    Sung, F., Yang, Y., Zhang, L., Xiang, T., Torr, P. H. S. and Hospedales, T. M. (2018). Learning to
    Compare: Relation Network for Few-Shot Learning. CVPR. https://arxiv.org/abs/1711.06025
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.functional import Params
from metalearn.algorithms.metric import MetricLearner, class_sums, mixes_examples
from metalearn.checks import one_of, positive_int
from metalearn.models.norm import norm_layer
from metalearn.objectives import Objective
from metalearn.tasks import TaskBatch, TaskSampler, probe

# Normalisation of the relation module (see metalearn.models.norm); batch_per_step is for inner loops.
RELATION_NORMS = ("batch", "batch_running", "group", "none")


def as_maps(features: Tensor, leading: int = 2) -> Tensor:
    """Feature maps [..., C, H, W] of embeddings with `leading` batch dimensions: maps stay as they are,
    vectors [..., d] become d x 1 x 1 maps."""
    if features.dim() == leading + 1:
        return features[..., None, None]
    if features.dim() != leading + 3:
        raise ValueError(f"model: Relation Networks compare feature maps [C, H, W] or vectors, but the model "
                         f"gives features of shape {tuple(features.shape[leading:])}")
    return features


def relation_module(channels: int, height: int, width: int, filters: int, hidden: int, norm: str) -> nn.Sequential:
    """The relation module for pairs of C x H x W maps, i.e. inputs [B, 2C, H, W]; outputs scores [B] in (0, 1)."""
    layers: list[nn.Module] = []
    in_channels = 2 * channels
    for _ in range(2):
        layers += [nn.Conv2d(in_channels, filters, 3, padding=1), norm_layer(norm, filters), nn.ReLU()]
        if min(height, width) >= 2:  # pooling a side of 1 would leave nothing
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        in_channels = filters
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * height * width, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1), nn.Sigmoid(), nn.Flatten(0))


class RelationNet(MetricLearner[TaskBatch]):
    """Relation Networks; the model is the embedding network, normally returning feature maps.

    Args:
        model: the embedding network; feature maps [C, H, W] per image, or vectors (read as d x 1 x 1).
        objective: must be classification (scores are regressed on one-hot labels).
        filters: the relation module's convolution filters; None: the embedding's channels (64 in the paper).
        hidden: units of the relation module's hidden linear layer (8 in the paper).
        norm: the relation module's normalisation: batch_running (BatchNorm with running statistics at
            evaluation), batch (batch statistics always), group or none.
        train_pass: `per_set` or `per_task`, how training steps embed a task under batch-statistics
            normalisation (see `MetricLearner`).

    The relation module is created by `setup(tasks)`, which must run before training or evaluation.
    Scores are relation scores in (0, 1); the query loss is their mean squared error to the one-hot
    labels. Batch-statistics normalisation in the relation module, as in the embedding (`embed_sets`),
    normalises each task's pairs on their own.
    """

    needs_classes_because: ClassVar[str] = "it scores each query against each class's support images"

    def __init__(self, model: nn.Module, objective: Objective, filters: int | None = None, hidden: int = 8,
                 norm: str = "batch_running", train_pass: str = "per_set") -> None:
        super().__init__(model, objective, train_pass)
        self.filters = None if filters is None else positive_int("filters", filters)
        self.hidden = positive_int("hidden", hidden)
        self.norm = one_of("norm", norm, RELATION_NORMS)
        self.relation: nn.Sequential | None = None

    def setup(self, tasks: TaskSampler) -> None:
        """Create the relation module for the feature-map shape the model gives on the task family."""
        out = probe(self.model, tasks)
        channels, height, width = as_maps(out, leading=1).shape[1:]
        self.relation = relation_module(channels, height, width, self.filters or channels, self.hidden, self.norm)
        self.relation.to(device=out.device, dtype=out.dtype)

    def fit(self, support: Tensor, support_y: Tensor, n_way: int) -> Params:
        """{"classes": [T, n_way, C, H, W]}, the sum of each class's support feature maps."""
        return {"classes": class_sums(as_maps(support), support_y, n_way)}

    def classify(self, state: Params, query: Tensor) -> Tensor:
        """Relation scores [T, Q, n_way] in (0, 1) of every query with every class."""
        if self.relation is None:
            raise RuntimeError("RelationNet creates its relation module in setup(tasks), from the model's feature "
                               "maps; call setup before training or evaluating")
        classes, queries = state["classes"], as_maps(query)
        tasks, n_queries, n_way = queries.shape[0], queries.shape[1], classes.shape[1]
        shape = (tasks, n_queries, n_way, *classes.shape[2:])
        # Pairs [T, Q, N, 2C, H, W]: the class's map first, then the query's (the paper's order).
        pairs = torch.cat([classes.unsqueeze(1).expand(shape), queries.unsqueeze(2).expand(shape)], dim=3)
        if mixes_examples(self.relation):
            scores = torch.stack([self.relation(task_pairs.flatten(0, 1)) for task_pairs in pairs])
        else:
            scores = self.relation(pairs.flatten(0, 2))
        return scores.view(tasks, n_queries, n_way)

    def query_loss(self, logits: Tensor, query_y: Tensor) -> Tensor:
        """Per-task mean squared error [T] of the scores [T, Q, N] to the one-hot labels [T, Q]."""
        targets = F.one_hot(query_y, logits.shape[-1]).to(logits.dtype)
        return (logits - targets).pow(2).mean(dim=(1, 2))

    def chance_loss(self, uniform: Tensor, query_y: Tensor) -> Tensor:
        """The loss of the MSE-optimal constant score 1/N, (N - 1) / N^2 per query, so that meta_loss and
        meta_loss_pre measure the same thing."""
        n_way = uniform.shape[-1]
        return self.query_loss(torch.full_like(uniform, 1 / n_way), query_y)
