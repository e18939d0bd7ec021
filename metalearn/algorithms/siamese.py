"""Siamese networks: learn a similarity of two images from same/different pairs, then classify a query
by its most similar support image.

The model is an embedding network f shared by both images of a pair ("twin" networks). The pair loss is
an object (the `algorithm/loss` config group) that gives the similarity of two embeddings, the loss of
a pair and the decision boundary. Two are here:

* KochLoss (Koch et al., 2015): the probability that a pair is of one class is
  p = sigmoid(sum_j alpha_j |f_j(x1) - f_j(x2)| + b), with learned weights alpha (one per embedding
  entry) and bias b, trained with binary cross-entropy. The similarity is the logit.
* ContrastiveLoss (Hadsell et al., 2006): with d = ||f(x1) - f(x2)||, the loss is d^2 / 2 for a same-class
  pair and max(0, margin - d)^2 / 2 for a different-class pair. The similarity is -d.

Few-shot classification (Koch's one-shot protocol, extended to k shots by nearest neighbour): a class's
score for a query is the largest similarity of the query to that class's support images. Training
uses pairs (`PairBatch`, half of them same-class) or, with `pairs=False`, every (query, support) pair
of training episodes (1/N of them same-class in N-way episodes).

References:
    Koch, G., Zemel, R. and Salakhutdinov, R. (2015). Siamese Neural Networks for One-shot Image
    Recognition. ICML Deep Learning Workshop. https://www.cs.cmu.edu/~rsalakhu/papers/oneshot1.pdf
    Hadsell, R., Chopra, S. and LeCun, Y. (2006). Dimensionality Reduction by Learning an Invariant
    Mapping. CVPR. https://doi.org/10.1109/CVPR.2006.100
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.base import StepResult
from metalearn.algorithms.functional import Params
from metalearn.algorithms.metric import MetricLearner, class_members
from metalearn.checks import positive_float
from metalearn.objectives import Objective
from metalearn.tasks import PairBatch, TaskBatch, TaskSampler, drawer, probe

# Added to the squared distance under the square root: the derivative of sqrt(s) is infinite at s = 0,
# and 0 * inf = NaN would be the gradient of a pair of identical embeddings. With it the derivative of
# d with respect to the embeddings has norm below 1 everywhere (zero at identical embeddings), and d
# changes by at most 1e-6 (at d = 0) or 5e-13 / d.
EPS = 1e-12


def contrastive_loss(distance: Tensor, same: Tensor, margin: float) -> Tensor:
    """Per-pair loss same * d^2 / 2 + (1 - same) * max(0, margin - d)^2 / 2 (Hadsell et al., eq. 4)."""
    return same * distance.pow(2) / 2 + (1 - same) * F.relu(margin - distance).pow(2) / 2


class PairLoss(Protocol):
    """How a Siamese network scores and trains on pairs of embeddings."""

    # The similarity on the decision boundary: a pair above it is verified as same-class.
    boundary: float
    # The names of the meta-parameters `parameters` makes, which the learner holds as its own.
    parameter_names: tuple[str, ...]

    def parameters(self, size: int, like: Tensor) -> dict[str, Tensor]:
        """The loss's own meta-parameters for embeddings of `size` entries (learned with the network)."""

    def similarity(self, first: Tensor, second: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Similarity of embeddings [..., d] (broadcast against each other)."""

    def __call__(self, similarity: Tensor, same: Tensor) -> Tensor:
        """Per-pair loss of similarities and same-class indicators (1.0 / 0.0) of the same shape."""


class KochLoss:
    """Koch et al.'s verification loss: p = sigmoid(sum_j alpha_j |f_j(x1) - f_j(x2)| + b), binary
    cross-entropy; the similarity is the logit, the boundary p = 1/2. alpha (one weight per embedding
    entry) and b are learned with the network."""

    boundary: float = 0.0
    parameter_names: tuple[str, ...] = ("alpha", "bias")

    def parameters(self, size: int, like: Tensor) -> dict[str, Tensor]:
        """alpha_j = -1/size and b = 0 (see Siamese): the untrained logit is minus the mean absolute difference."""
        return {"alpha": torch.full((size,), -1.0 / size, device=like.device, dtype=like.dtype),
                "bias": torch.zeros((), device=like.device, dtype=like.dtype)}

    def similarity(self, first: Tensor, second: Tensor, params: dict[str, Tensor]) -> Tensor:
        return ((first - second).abs() * params["alpha"]).sum(-1) + params["bias"]

    def __call__(self, similarity: Tensor, same: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(similarity, same, reduction="none")


class ContrastiveLoss:
    """Hadsell et al.'s contrastive loss on the Euclidean distance d: d^2 / 2 for a same-class pair,
    max(0, margin - d)^2 / 2 for a different-class one; the similarity is -d.

    Args:
        margin: different-class pairs closer than this are pushed apart; a pair is verified as
            same-class when d < margin / 2.
    """

    parameter_names: tuple[str, ...] = ()

    def __init__(self, margin: float = 1.0) -> None:
        self.margin = positive_float("margin", margin)
        self.boundary = -self.margin / 2

    def parameters(self, size: int, like: Tensor) -> dict[str, Tensor]:
        return {}

    def similarity(self, first: Tensor, second: Tensor, params: dict[str, Tensor]) -> Tensor:
        return -((first - second).pow(2).sum(-1) + EPS).sqrt()

    def __call__(self, similarity: Tensor, same: Tensor) -> Tensor:
        return contrastive_loss(-similarity, same, self.margin)


class Siamese(MetricLearner[TaskBatch | PairBatch]):
    """Siamese networks; the model is the embedding network (normally without a head).

    Args:
        model: the embedding network f; its outputs, flattened, are the embeddings.
        objective: must be classification.
        loss: the pair loss: KochLoss (learned weighted L1 distance, sigmoid, binary cross-entropy; None
            means it) or ContrastiveLoss (Euclidean distance with a margin). In a config, the
            `algorithm/loss` group chooses it (koch, contrastive).
        pairs: train on `PairBatch`es of image pairs drawn from the training classes (Koch's protocol); False:
            on episodes, every (query, support) pair of each episode being a training pair.

    `setup(tasks)` creates the loss's parameters, Koch's alpha (sized by probing the model with a
    validation episode) and b, as the learner's own (`alpha`, `bias`).
    They start at alpha_j = -1/size and b = 0: the untrained logit is minus the mean absolute difference,
    so even the untrained network classifies by L1 nearest neighbour, and no random numbers are drawn.
    Koch draws alpha from N(0, 0.2^2): a random-sign weighting that classifies at chance until trained
    (measured on Omniglot, 150 steps of 64 pairs, Adam 1e-3: 43% 5-way 1-shot test accuracy from a
    random-sign start, 60% from ours).

    Metrics of a training step: the mean pair loss, and as score the verification accuracy (koch:
    p > 1/2 predicts "same"; contrastive: d < margin / 2). "Before" is a prediction on the decision
    boundary for every pair (p = 1/2; d = margin / 2), with ties read as "different" as MetricLearner
    reads equal logits as class 0: loss log 2 (koch) or margin^2 / 8 (contrastive), which on balanced
    pairs is also the best loss of any constant prediction, and accuracy the fraction of different-class
    pairs (1/2 for `PairBatch`es, (N-1)/N for the pairs of N-way episodes). Evaluation (episodes): the
    scores are the per-class maximum similarities, the loss their cross-entropy, "before" chance level
    (see `MetricLearner`).
    """

    needs_classes_because: ClassVar[str] = "it classifies queries by their most similar support example"
    alpha: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(self, model: nn.Module, objective: Objective, loss: PairLoss | None = None,
                 pairs: bool = True) -> None:
        super().__init__(model, objective)
        if isinstance(loss, str):
            raise ValueError(f"loss={loss!r}: an object, not a name; in a config choose it with "
                             f"algorithm/loss={loss} (options: conf/algorithm/loss/)")
        self.loss: PairLoss = KochLoss() if loss is None else loss
        self.pairs = bool(pairs)
        for name in self.loss.parameter_names:
            self.register_parameter(name, None)

    def setup(self, tasks: TaskSampler) -> None:
        """Check that the task family draws pairs (with `pairs`); create the loss's parameters (Koch's
        alpha [embedding size] and b) once; contrastive has none."""
        if self.pairs:
            drawer(tasks, "sample_pairs", "pairs")
        if not self.loss.parameter_names:
            return
        out = probe(self.model, tasks)
        for name, value in self.loss.parameters(out[0].numel(), out).items():
            current = getattr(self, name)
            if current is None:
                setattr(self, name, nn.Parameter(value))
            elif current.shape != value.shape:
                raise ValueError(f"the model's embedding has {out[0].numel()} entries, but {name} was made for "
                                 f"{current.numel()}")

    def similarity(self, first: Tensor, second: Tensor) -> Tensor:
        """Similarity of embeddings [..., d] (broadcast against each other) under the loss: Koch's logit,
        or -distance."""
        params = {name: getattr(self, name) for name in self.loss.parameter_names}
        if any(p is None for p in params.values()):
            raise RuntimeError(f"Siamese({type(self.loss).__name__}) has no alpha yet: call setup(tasks) first "
                               "(metalearn.compose does), which sizes it from the model's embedding")
        return self.loss.similarity(first, second, params)

    def predicts_same(self, similarity: Tensor) -> Tensor:
        """Whether each pair is verified as same-class: above the loss's boundary (p > 1/2, d < margin / 2)."""
        return similarity > self.loss.boundary

    def fit(self, support: Tensor, support_y: Tensor, n_way: int) -> Params:
        """{"support": the flattened support embeddings [T, n, d], "members": [T, n, n_way], whether each
        support example is of each class}."""
        return {"support": support.flatten(2), "members": class_members(support_y, n_way).bool()}

    def classify(self, state: Params, query: Tensor) -> Tensor:
        """Per class, the largest similarity [T, Q, n_way] of each query to that class's support examples."""
        similarities = self.similarity(query.flatten(2).unsqueeze(2), state["support"].unsqueeze(1))  # [T, Q, n]
        outside = ~state["members"].unsqueeze(1)  # [T, 1, n, n_way]
        return similarities.unsqueeze(-1).masked_fill(outside, -math.inf).amax(dim=2)

    def draw(self, tasks: TaskSampler, batch_size: int, generator: torch.Generator) -> TaskBatch | PairBatch:
        """`batch_size` pairs of training images (`pairs`), else `batch_size` training episodes."""
        if self.pairs:
            pairs: PairBatch = drawer(tasks, "sample_pairs", "pairs")(batch_size, "train", generator)
            return pairs
        return super().draw(tasks, batch_size, generator)

    def meta_train_step(self, batch: TaskBatch | PairBatch) -> StepResult:
        """The mean pair loss over a `PairBatch`, or over every (query, support) pair of each episode of a
        `TaskBatch`; fills `.grad`. Returns the pair metrics (see the class docstring)."""
        if isinstance(batch, PairBatch):
            first, second = self.model(torch.cat([batch.x1, batch.x2])).flatten(1).chunk(2)
            same = batch.same.to(first.dtype)
        else:
            support, query = self.embed([batch.support_x, batch.query_x])
            first, second = query.flatten(2).unsqueeze(2), support.flatten(2).unsqueeze(1)  # -> [T, Q, S] pairs
            same = (batch.query_y.unsqueeze(2) == batch.support_y.unsqueeze(1)).to(first.dtype)
        similarity = self.similarity(first, second)
        loss = self.loss(similarity, same).mean()
        loss.backward()
        accuracy = (self.predicts_same(similarity.detach()) == same.bool()).to(same.dtype).mean()
        if self.measure_pre_adaptation:
            boundary = torch.full_like(same, self.loss.boundary)
            loss_pre = self.loss(boundary, same).mean().item()
            score_pre = (self.predicts_same(boundary) == same.bool()).to(same.dtype).mean().item()
        else:
            loss_pre = score_pre = math.nan
        return StepResult(loss.item(), loss_pre, accuracy.item(), score_pre)
