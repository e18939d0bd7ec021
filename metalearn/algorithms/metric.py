"""The shared shape of metric-based few-shot classifiers (Prototypical, Matching, Relation and
Siamese networks, and the fine-tuning baselines at test time).

The model is an embedding network. Adapting to a task embeds its support set and turns it into a
per-task state (prototypes, the support embeddings themselves, a fitted head); a query is classified
by comparing its embedding with that state. Nothing adapts by gradient steps on the embedding, so
there is no inner loop; meta-training backpropagates the query loss through the comparison into the
embedding network (and any meta-parameters of the comparison).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.func import vmap

from metalearn.algorithms.base import B, GradientLearner, StepResult, TaskScores, illustrated
from metalearn.algorithms.functional import Params
from metalearn.checks import one_of, positive_float
from metalearn.models.norm import PerStepBatchNorm2d
from metalearn.objectives import Classification, Objective, at_least_float32
from metalearn.runtime import full_precision
from metalearn.tasks import Task, TaskBatch, TaskSampler

# How training steps embed a task's support and query sets under batch-statistics normalisation.
TRAIN_PASSES = ("per_set", "per_task")


def mixes_examples(model: nn.Module) -> bool:
    """Whether, in its current mode, the model's output for one image depends on the other images of
    the batch: BatchNorm normalising with batch statistics (training mode, or no running statistics)."""
    return any(isinstance(m, PerStepBatchNorm2d)
               or (isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None))
               for m in model.modules())


def embed_sets(model: nn.Module, sets: Sequence[Tensor], per_task: bool = False) -> list[Tensor]:
    """Embeddings [T, n_i, *feature_shape] of image sets [T, n_i, ...] (support, query, ...).

    The embeddings are at least float32, also under reduced-precision autocast (trainer.precision), so that
    distances, prototypes and similarities are computed at full precision.

    Batch-statistics normalisation (`mixes_examples`) makes an image's embedding depend on its batch;
    then every task's sets get their own forward pass, so nothing leaks between tasks or from a query
    set into a support set; with `per_task`, each task's sets share one pass (normalised together, as
    Snell et al.'s code trains), and still nothing leaks between tasks. Otherwise (running statistics in
    eval mode, GroupNorm, none) all images go through the network in one pass, with the same result.
    """
    if mixes_examples(model):
        if not per_task:
            return [torch.stack([at_least_float32(model(images)) for images in one_set]) for one_set in sets]
        sizes = [images.shape[1] for images in sets]
        tasks = [at_least_float32(model(torch.cat([images[t] for images in sets]))).split(sizes)
                 for t in range(sets[0].shape[0])]
        return [torch.stack(parts) for parts in zip(*tasks)]
    flat = at_least_float32(model(torch.cat([images.flatten(0, 1) for images in sets])))
    parts = flat.split([images.shape[0] * images.shape[1] for images in sets])
    return [part.view(images.shape[0], images.shape[1], *part.shape[1:]) for part, images in zip(parts, sets)]


def class_members(support_y: Tensor, n_way: int) -> Tensor:
    """One-hot class membership [T, n, n_way] (int64) of the support labels [T, n] in 0..n_way-1,
    checking that every class of every task has an example."""
    members = F.one_hot(support_y, n_way)
    if bool((members.sum(1) == 0).any()):
        raise ValueError(f"support_y: every class 0..{n_way - 1} needs a support example in every task")
    return members


def class_sums(features: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """[T, n_way, ...]: per task, the sum of each class's support features [T, n, ...] (labels [T, n]
    in 0..n_way-1; every class needs an example). Exact: a product with the one-hot membership."""
    members = class_members(labels, n_way).to(features.dtype)
    return (members.transpose(1, 2) @ features.flatten(2)).view(features.shape[0], n_way, *features.shape[2:])


def n_way_of(labels: Tensor) -> int:
    """Classes of an episode whose labels are 0..N-1."""
    return int(labels.max()) + 1


class MetricLearner(GradientLearner[B]):
    """Base class: embed, `fit` a per-task state on the support embeddings, `classify` queries.

    Subclasses implement `fit` and `classify` (and may override `query_loss`); both run with autocast
    off (`runtime.full_precision`), on float32 embeddings, whatever `trainer.precision` is. Metrics: "after" is
    the metric classifier; "before" (no adaptation) is chance, the uniform logits of a classifier that
    knows nothing of the task: loss log(n_way), and the accuracy of argmax over equal logits
    (class 0), i.e. 1 / n_way on balanced query sets.

    Args:
        model: the embedding network.
        objective: must be classification.
        train_pass: how training steps embed a task's sets when the model normalises with batch
            statistics (`mixes_examples`): `per_set` (support and query in separate passes, each normalised
            by its own statistics) or `per_task` (one pass over the task's support and query images, as
            Snell et al.'s code trains). Evaluation always embeds per set, so no query shapes the
            normalisation of a support set at test time, whatever this is.
    """

    # The model outputs embeddings, not one value per class, so a check that its output size equals the
    # number of classes does not apply.
    model_predicts_targets: ClassVar[bool] = False
    # Why the method needs classes, for the error on other task families.
    needs_classes_because: ClassVar[str] = "it classifies queries by comparing them with the support set"
    scale: Tensor

    def __init__(self, model: nn.Module, objective: Objective, train_pass: str = "per_set") -> None:
        if not isinstance(objective, Classification):
            raise ValueError(f"{type(self).__name__} needs a classification dataset ({self.needs_classes_because}), "
                             f"but the dataset's objective is {type(objective).__name__} (metric {objective.metric})")
        super().__init__(model, objective)
        self.train_pass = one_of("train_pass", train_pass, TRAIN_PASSES)

    def _register_scale(self, scale: float, learn: bool) -> None:
        """`self.scale`: a meta-parameter starting at `scale` if `learn`, else a fixed buffer."""
        initial = torch.tensor(positive_float("scale", scale))
        if learn:
            self.scale = nn.Parameter(initial)
        else:
            self.register_buffer("scale", initial)

    def embed(self, sets: Sequence[Tensor]) -> list[Tensor]:
        """Embeddings [T, n_i, *feature_shape] of image sets [T, n_i, ...]; see `embed_sets` (with
        `train_pass=per_task`, training steps embed each task in one pass)."""
        return embed_sets(self.model, sets, per_task=self.training and self.train_pass == "per_task")

    @abstractmethod
    def fit(self, support: Tensor, support_y: Tensor, n_way: int) -> Params:
        """The per-task state (each entry with a leading task dimension) from support embeddings
        [T, n, *feature_shape] and their labels [T, n] in 0..n_way-1."""

    @abstractmethod
    def classify(self, state: Params, query: Tensor) -> Tensor:
        """Class scores [T, Q, n_way] (argmax is the prediction) of query embeddings [T, Q, ...]."""

    def query_loss(self, logits: Tensor, query_y: Tensor) -> Tensor:
        """Per-task query loss [T] of the scores: the objective's cross-entropy by default."""
        return vmap(self.objective.loss)(logits, query_y)

    def chance_loss(self, uniform: Tensor, query_y: Tensor) -> Tensor:
        """Per-task query loss [T] of a classifier that knows nothing of the task, given its uniform
        scores [T, Q, N] (zeros): `query_loss` of them by default, i.e. cross-entropy log N."""
        return self.query_loss(uniform, query_y)

    def _outcome(self, batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-task query loss (differentiable), then detached chance-level loss, accuracy and
        chance-level accuracy (NaN while training with `measure_pre_adaptation` off)."""
        support, query = self.embed([batch.support_x, batch.query_x])
        with full_precision(support.device):
            logits = self.classify(self.fit(support, batch.support_y, n_way_of(batch.support_y)), query)
        score = vmap(self.objective.score)
        uniform = torch.zeros_like(logits.detach())
        if self.measure_pre_adaptation or not torch.is_grad_enabled():  # evaluation always measures them
            loss_pre, score_pre = self.chance_loss(uniform, batch.query_y), score(uniform, batch.query_y)
        else:
            loss_pre = score_pre = torch.full((len(batch),), math.nan, dtype=logits.dtype, device=logits.device)
        return self.query_loss(logits, batch.query_y), loss_pre, score(logits.detach(), batch.query_y), score_pre

    def adapt(self, task: Task, *, create_graph: bool = False) -> Params:
        """The task's state (see `fit`, without the task dimension); differentiable with respect to
        the embedding network iff `create_graph`."""
        with torch.set_grad_enabled(create_graph):
            (support,) = self.embed([task.support_x.unsqueeze(0)])
            with full_precision(support.device):
                state = self.fit(support, task.support_y.unsqueeze(0), n_way_of(task.support_y))
        return {name: value[0] for name, value in state.items()}

    def meta_train_step(self, batch: B) -> StepResult:
        # Episodes; a learner that trains on other batches (pairs, labelled minibatches) overrides this.
        loss, loss_pre, score, score_pre = self._outcome(cast(TaskBatch, batch))
        loss.mean().backward()
        return StepResult(loss.mean().item(), loss_pre.mean().item(), score.mean().item(), score_pre.mean().item())

    def evaluate(self, batch: TaskBatch) -> TaskScores:
        with torch.no_grad():
            return TaskScores(*self._outcome(batch))

    def predict(self, task: Task, x: Tensor) -> tuple[Tensor, Tensor]:
        """(uniform logits, metric classifier's scores) of the images `x` [n, ...] for `task`."""
        with torch.no_grad():
            state = {name: value.unsqueeze(0) for name, value in self.adapt(task).items()}
            (embedded,) = self.embed([x.unsqueeze(0)])
            with full_precision(embedded.device):
                after = self.classify(state, embedded)[0]
        return torch.zeros_like(after), after

    def illustrate(self, tasks: TaskSampler, generator: torch.Generator) -> Figure | None:
        """The task family's own picture (`Illustrated`) of the uniform and the metric classifier's scores."""
        return illustrated(tasks, self.predict, generator)
