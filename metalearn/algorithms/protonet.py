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

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from metalearn.algorithms.base import MetaAlgorithm, StepResult, TaskScores
from metalearn.algorithms.functional import Params
from metalearn.checks import one_of
from metalearn.models.norm import PerStepBatchNorm2d
from metalearn.objectives import Classification, Objective
from metalearn.tasks import Task, TaskBatch

DISTANCES = ("euclidean", "cosine")


def mixes_examples(model: nn.Module) -> bool:
    """Whether, in its current mode, the model's output for one image depends on the other images of
    the batch: BatchNorm normalising with batch statistics (training mode, or no running statistics)."""
    return any(isinstance(m, PerStepBatchNorm2d)
               or (isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None))
               for m in model.modules())


def class_means(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Prototypes [T, n_way, d]: per task, the mean embedding of each class (any number of shots).

    Args:
        embeddings: support embeddings [T, n, d].
        labels: their classes [T, n], in 0..n_way-1; every class needs at least one example.
    """
    tasks, _, d = embeddings.shape
    # One index_add over all tasks: task t's class k accumulates in row t * n_way + k.
    index = (labels + n_way * torch.arange(tasks, device=labels.device).unsqueeze(1)).flatten()
    sums = embeddings.new_zeros(tasks * n_way, d).index_add(0, index, embeddings.reshape(-1, d))
    counts = torch.bincount(index, minlength=tasks * n_way)
    if bool((counts == 0).any()):
        raise ValueError(f"support_y: every class 0..{n_way - 1} needs a support example in every task")
    return (sums / counts.unsqueeze(1).to(sums.dtype)).view(tasks, n_way, d)


def similarities(queries: Tensor, prototypes: Tensor, distance: str) -> Tensor:
    """[T, Q, N]: minus the squared Euclidean distance, or the cosine similarity, of every query [T, Q, d]
    to every prototype [T, N, d]."""
    if distance == "cosine":
        return F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
    # ||q - c||^2 = ||q||^2 - 2 q.c + ||c||^2: one matrix product instead of a [T, Q, N, d] difference.
    squared = (queries.pow(2).sum(-1, keepdim=True) - 2 * queries @ prototypes.transpose(1, 2)
               + prototypes.pow(2).sum(-1).unsqueeze(1))
    return -squared


class ProtoNet(MetaAlgorithm):
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

    Metrics: "after" is the prototype classifier; "before" (no adaptation) is chance, the uniform
    logits of a classifier that knows nothing of the task: loss log(n_way), and the accuracy of
    argmax over equal logits (class 0), i.e. 1 / n_way on balanced query sets.

    Batch-statistics normalisation (`mixes_examples`) makes an image's embedding depend on its batch;
    then every task's support set and query set get their own forward pass, so nothing leaks between
    tasks or from query into the prototypes. Otherwise (running statistics in eval mode, GroupNorm,
    none) all images of the meta-batch go through the network in one pass, with the same result.
    """

    # The model outputs embeddings, not one value per class, so a check that its output size equals the
    # number of classes does not apply.
    model_predicts_targets: ClassVar[bool] = False
    scale: Tensor

    def __init__(self, model: nn.Module, objective: Objective, distance: str = "euclidean", scale: float = 1.0,
                 learn_scale: bool = False) -> None:
        if not isinstance(objective, Classification):
            raise ValueError(f"ProtoNet needs a classification dataset: prototypes are class means and its loss "
                             f"is cross-entropy, but the dataset's objective is {type(objective).__name__} "
                             f"(metric {objective.metric})")
        super().__init__(model, objective)
        self.distance = one_of("distance", distance, DISTANCES)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
            raise ValueError(f"scale={scale!r}: must be a finite number > 0")
        initial = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(initial)
        else:
            self.register_buffer("scale", initial)

    def _embed(self, sets: Sequence[Tensor]) -> list[Tensor]:
        """Embeddings [T, n_i, d] of image sets [T, n_i, ...] (support, query, ...)."""
        if mixes_examples(self.model):
            return [torch.stack([self.model(images).flatten(1) for images in per_task]) for per_task in sets]
        flat = self.model(torch.cat([images.flatten(0, 1) for images in sets])).flatten(1)
        parts = flat.split([images.shape[0] * images.shape[1] for images in sets])
        return [part.view(images.shape[0], images.shape[1], -1) for part, images in zip(parts, sets)]

    def logits(self, prototypes: Tensor, queries: Tensor) -> Tensor:
        """Class logits [T, Q, N] of query embeddings [T, Q, d] given prototypes [T, N, d]."""
        return self.scale * similarities(queries, prototypes, self.distance)

    def _outcome(self, batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-task query loss with prototypes (differentiable), then detached chance-level loss,
        prototype accuracy and chance-level accuracy (see the class docstring; NaN while training with
        `measure_pre_adaptation` off, as the base class asks)."""
        n_way = int(batch.support_y.max()) + 1
        support, query = self._embed([batch.support_x, batch.query_x])
        logits = self.logits(class_means(support, batch.support_y, n_way), query)
        loss, score = vmap(self.objective.loss), vmap(self.objective.score)
        uniform = torch.zeros_like(logits.detach())
        if self.measure_pre_adaptation or not torch.is_grad_enabled():  # evaluation always measures them
            loss_pre, score_pre = loss(uniform, batch.query_y), score(uniform, batch.query_y)
        else:
            loss_pre = score_pre = torch.full((len(batch),), math.nan, dtype=logits.dtype, device=logits.device)
        return loss(logits, batch.query_y), loss_pre, score(logits.detach(), batch.query_y), score_pre

    def adapt(self, task: Task, *, create_graph: bool = False, steps: int | None = None) -> Params:
        """The task's prototypes, {"prototypes": [n_way, d]}; differentiable with respect to the
        embedding network iff `create_graph`. `steps` is accepted for the interface and has no
        effect (there is no inner loop)."""
        with torch.set_grad_enabled(create_graph):
            (support,) = self._embed([task.support_x.unsqueeze(0)])
            prototypes = class_means(support, task.support_y.unsqueeze(0), int(task.support_y.max()) + 1)
        return {"prototypes": prototypes[0]}

    def meta_train_step(self, batch: TaskBatch) -> StepResult:
        loss, loss_pre, score, score_pre = self._outcome(batch)
        loss.mean().backward()
        return StepResult(loss.mean().item(), loss_pre.mean().item(), score.mean().item(), score_pre.mean().item())

    def evaluate(self, batch: TaskBatch) -> TaskScores:
        with torch.no_grad():
            return TaskScores(*self._outcome(batch))

    def predict(self, task: Task, x: Tensor) -> tuple[Tensor, Tensor]:
        """(uniform logits, prototype logits) of the images `x` [n, ...] for `task`."""
        with torch.no_grad():
            prototypes = self.adapt(task)["prototypes"]
            (embedded,) = self._embed([x.unsqueeze(0)])
            after = self.logits(prototypes.unsqueeze(0), embedded)[0]
        return torch.zeros_like(after), after
