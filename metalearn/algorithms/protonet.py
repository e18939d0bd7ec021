"""Prototypical Networks: classify a query by its distance to each class's mean support embedding.

The model is an embedding network f. Adapting to a task computes one prototype per class, the mean of
f over that class's support images; a query x gets the logits scale * -||f(x) - c_k||^2 over the
prototypes c_k, and meta-training minimises their cross-entropy on the query set, backpropagating
through the prototypes into f. There is no inner optimisation, hence no inner steps or learning rate.

References:
    Snell, J., Swersky, K. and Zemel, R. (2017). Prototypical Networks for Few-shot Learning.
    NeurIPS. https://arxiv.org/abs/1703.05175
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.functional import Params
from metalearn.algorithms.metric import MetricLearner, class_members, class_sums
from metalearn.checks import one_of
from metalearn.objectives import Objective
from metalearn.tasks import TaskBatch

DISTANCES = ("euclidean", "cosine")


def class_means(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Prototypes [T, n_way, d]: per task, the mean embedding [T, n, d] of each class (any number of
    shots; labels [T, n] in 0..n_way-1, every class needs an example)."""
    counts = class_members(labels, n_way).sum(1).unsqueeze(-1)  # [T, n_way, 1]
    return class_sums(embeddings, labels, n_way) / counts.to(embeddings.dtype)


def similarities(queries: Tensor, prototypes: Tensor, distance: str) -> Tensor:
    """[T, Q, N]: minus the squared Euclidean distance, or the cosine similarity, of every query [T, Q, d]
    to every prototype [T, N, d]."""
    if distance == "cosine":
        return F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
    # ||q - c||^2 = ||q||^2 - 2 q.c + ||c||^2: one matrix product instead of a [T, Q, N, d] difference.
    squared = (queries.pow(2).sum(-1, keepdim=True) - 2 * queries @ prototypes.transpose(1, 2)
               + prototypes.pow(2).sum(-1).unsqueeze(1))
    return -squared


class ProtoNet(MetricLearner[TaskBatch]):
    """Prototypical Networks; the model is the embedding network (normally without a head).

    Args:
        model: the embedding network f; its outputs, flattened, are the embeddings.
        objective: must be classification (prototypes are class means; the loss is cross-entropy).
        distance: `euclidean` (squared Euclidean distance, the paper's) or `cosine` (cosine similarity,
            which the paper found worse).
        scale: logits are scale * similarity. 1 is the paper's Euclidean classifier; cosine
            similarities lie in [-1, 1], so cosine needs a larger scale (e.g. 10) to express a
            confident softmax (Oreshkin et al., 2018, TADAM, "metric scaling").
        learn_scale: make `scale` a meta-parameter (its initial value is `scale`); otherwise fixed.
        train_pass: `per_set` or `per_task`, how training steps embed a task under batch-statistics
            normalisation (see `MetricLearner`).

    Metrics and batch-statistics normalisation: see `MetricLearner` and `embed_sets`.
    """

    needs_classes_because: ClassVar[str] = "prototypes are class means and its loss is cross-entropy"

    def __init__(self, model: nn.Module, objective: Objective, distance: str = "euclidean", scale: float = 1.0,
                 learn_scale: bool = False, train_pass: str = "per_set") -> None:
        super().__init__(model, objective, train_pass)
        self.distance = one_of("distance", distance, DISTANCES)
        self._register_scale(scale, learn_scale)

    def fit(self, support: Tensor, support_y: Tensor, n_way: int) -> Params:
        """{"prototypes": [T, n_way, d]}, the class means of the flattened support embeddings."""
        return {"prototypes": class_means(support.flatten(2), support_y, n_way)}

    def classify(self, state: Params, query: Tensor) -> Tensor:
        """scale * similarity [T, Q, n_way] of the flattened query embeddings to the prototypes."""
        return self.logits(state["prototypes"], query.flatten(2))

    def logits(self, prototypes: Tensor, queries: Tensor) -> Tensor:
        """Class logits [T, Q, N] of query embeddings [T, Q, d] given prototypes [T, N, d]."""
        return self.scale * similarities(queries, prototypes, self.distance)
