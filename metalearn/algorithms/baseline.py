"""Baseline and Baseline++: pre-train a classifier on all training classes, then fit a new head on each
task's support set with the embedding frozen.

Training is plain supervised learning: the embedding network f and a head over all training classes
minimise the cross-entropy of labelled minibatches (`LabeledBatch`). The head is linear (Baseline:
logits W f(x) + b) or cosine (Baseline++: logits scale * cos(f(x), w_c), which the paper credits with
reducing intra-class variation). At test time the pre-training head is discarded and, per task, a new
head of the same kind is trained on the support embeddings as in the paper's code: SGD with lr 0.01,
momentum 0.9, dampening 0.9, weight decay 1e-3, minibatches of 4, 100 epochs over the support set.

References:
    Chen, W.-Y., Liu, Y.-C., Kira, Z., Wang, Y.-C. F. and Huang, J.-B. (2019). A Closer Look at
    Few-shot Classification. ICLR. https://arxiv.org/abs/1904.04232
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.base import StepResult
from metalearn.algorithms.functional import Params
from metalearn.algorithms.metric import MetricLearner
from metalearn.checks import non_negative_float, non_negative_int, one_of, positive_float, positive_int
from metalearn.objectives import Objective
from metalearn.tasks import LabeledBatch, TaskSampler, drawer, probe

HEADS = ("linear", "cosine")


def head_logits(kind: str, features: Tensor, weight: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Logits [..., B, N] of features [..., B, d] under class weights [..., N, d] (any leading task
    dimensions): linear, features @ weight^T + bias; cosine, scale * cos(feature, weight row)."""
    if kind == "cosine":
        return scale * F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).transpose(-1, -2)
    assert bias is not None
    return features @ weight.transpose(-1, -2) + bias.unsqueeze(-2)


class Baseline(MetricLearner[LabeledBatch]):
    """Baseline (linear head) and Baseline++ (cosine head); the model is the embedding network.

    Args:
        model: the embedding network f; its outputs, flattened, are the features.
        objective: must be classification.
        head: `linear` (Baseline) or `cosine` (Baseline++), for pre-training and for the test-time heads.
        scale: cosine logits are scale * cosine. None: the paper's code's rule for each head, 2 up to
            200 classes and 10 above (so 2 for the N-way test heads; the code's weight-normalised rows
            also learn a norm per class, which this plain cosine head leaves out).
        fit_lr, fit_momentum, fit_dampening, fit_weight_decay: the test-time head's SGD settings.
        fit_batch_size: support examples per SGD step (the last minibatch of an epoch may be smaller).
        fit_epochs: passes over the support set.
        fit_seed: seeds the test-time head's initialisation and minibatch order. Every task of a batch gets
            the same draws, so a task's result does not depend on the batch it is evaluated in, and
            evaluation is reproducible.

    `setup(tasks)` creates the pre-training head, sized by `tasks.num_classes("train")` and the
    embedding size (probed with a validation episode); it is initialised like a PyTorch linear layer.

    Metrics: training steps report the minibatch's cross-entropy and accuracy over all training
    classes; "before" is chance as in `MetricLearner`: uniform logits, loss log(classes), accuracy the
    rate of class 0 (the argmax of equal logits). Evaluation: the fitted head's query cross-entropy and
    accuracy, "before" chance. The fitted head is a function of detached support features: no gradient
    reaches the embedding through it, also with `adapt(create_graph=True)`.
    """

    needs_classes_because: ClassVar[str] = "it pre-trains a classifier over the training classes"
    head: nn.Linear | None

    def __init__(self, model: nn.Module, objective: Objective, head: str = "linear", scale: float | None = None,
                 fit_lr: float = 0.01, fit_momentum: float = 0.9, fit_dampening: float = 0.9,
                 fit_weight_decay: float = 1e-3, fit_batch_size: int = 4, fit_epochs: int = 100,
                 fit_seed: int = 0) -> None:
        super().__init__(model, objective)
        self.head_kind = one_of("head", head, HEADS)
        self.cosine_scale = None if scale is None else positive_float("scale", scale, null_ok=True)
        self.fit_lr = non_negative_float("fit_lr", fit_lr)
        self.fit_momentum = non_negative_float("fit_momentum", fit_momentum)
        self.fit_dampening = non_negative_float("fit_dampening", fit_dampening)
        self.fit_weight_decay = non_negative_float("fit_weight_decay", fit_weight_decay)
        self.fit_batch_size = positive_int("fit_batch_size", fit_batch_size)
        self.fit_epochs = non_negative_int("fit_epochs", fit_epochs)
        self.fit_seed = non_negative_int("fit_seed", fit_seed)
        self.register_module("head", None)

    def scale_for(self, classes: int) -> float:
        """The cosine head's scale over `classes` classes."""
        if self.cosine_scale is not None:
            return self.cosine_scale
        return 2.0 if classes <= 200 else 10.0

    def setup(self, tasks: TaskSampler) -> None:
        """Check that the task family draws labelled minibatches; create the pre-training head over
        `tasks.num_classes("train")` classes (once)."""
        num_classes = getattr(tasks, "num_classes", None)
        if not callable(num_classes):
            raise ValueError(f"{type(self).__name__} pre-trains on labelled examples of all training classes, "
                             f"which this task family ({type(tasks).__name__}) cannot count")
        drawer(tasks, "sample_labeled", "labelled minibatches")
        out = probe(self.model, tasks)
        classes, size = int(num_classes("train")), out[0].numel()
        if self.head is None:
            self.head = nn.Linear(size, classes, bias=self.head_kind == "linear", device=out.device, dtype=out.dtype)
        elif (self.head.out_features, self.head.in_features) != (classes, size):
            raise ValueError(f"the head was made for {self.head.out_features} classes and {self.head.in_features} "
                             f"features, the task family has {classes} and the model gives {size}")

    def pretraining_logits(self, x: Tensor) -> Tensor:
        """Logits [B, classes] of images [B, ...] under the pre-training head."""
        if self.head is None:
            raise RuntimeError(f"{type(self).__name__} has no pre-training head: call setup(tasks) first "
                               "(metalearn.compose does), which sizes it from tasks.num_classes('train')")
        return head_logits(self.head_kind, self.model(x).flatten(1), self.head.weight, self.head.bias,
                           self.scale_for(self.head.out_features))

    def draw(self, tasks: TaskSampler, batch_size: int, generator: torch.Generator) -> LabeledBatch:
        """`batch_size` labelled training images, from all training classes."""
        batch: LabeledBatch = drawer(tasks, "sample_labeled", "labelled minibatches")(batch_size, "train", generator)
        return batch

    def meta_train_step(self, batch: LabeledBatch) -> StepResult:
        """Cross-entropy of the pre-training head on a `LabeledBatch`; fills `.grad`."""
        if not isinstance(batch, LabeledBatch):
            raise TypeError(f"{type(self).__name__} trains on labelled minibatches of all training classes "
                            f"(see draw), not on {type(batch).__name__}")
        logits = self.pretraining_logits(batch.x)
        loss = self.objective.loss(logits, batch.y)
        loss.backward()
        score = self.objective.score(logits.detach(), batch.y).item()
        if self.measure_pre_adaptation:
            uniform = torch.zeros_like(logits.detach())
            loss_pre, score_pre = (f(uniform, batch.y).item() for f in (self.objective.loss, self.objective.score))
        else:
            loss_pre = score_pre = math.nan
        return StepResult(loss.item(), loss_pre, score, score_pre)

    def fit(self, support: Tensor, support_y: Tensor, n_way: int) -> Params:
        """A new head per task ({"weight": [T, n_way, d]} and, linear, {"bias": [T, n_way]}) trained on the
        detached support features [T, n, d] with SGD; all tasks at once, as the summed loss's gradient
        with respect to a task's weights is that task's own."""
        features = support.detach().flatten(2)
        tasks, n, d = features.shape
        generator = torch.Generator().manual_seed(self.fit_seed)
        bound = 1 / math.sqrt(d)  # PyTorch's linear-layer initialisation, drawn from `generator`
        shapes = {"weight": (n_way, d), **({"bias": (n_way,)} if self.head_kind == "linear" else {})}
        state = {name: ((torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
                 .to(features).expand(tasks, *shape).clone().requires_grad_() for name, shape in shapes.items()}
        optimizer = torch.optim.SGD(list(state.values()), lr=self.fit_lr, momentum=self.fit_momentum,
                                    dampening=self.fit_dampening, weight_decay=self.fit_weight_decay)
        scale = self.scale_for(n_way)
        with torch.enable_grad():
            for _ in range(self.fit_epochs):
                order = torch.randperm(n, generator=generator).to(features.device)
                for chosen in order.split(self.fit_batch_size):
                    logits = head_logits(self.head_kind, features[:, chosen], state["weight"], state.get("bias"),
                                         scale)
                    # Each task's mean over its minibatch, summed over tasks.
                    loss = F.cross_entropy(logits.transpose(1, 2), support_y[:, chosen], reduction="none").mean(1).sum()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        return {name: value.detach() for name, value in state.items()}

    def classify(self, state: Params, query: Tensor) -> Tensor:
        """The fitted heads' logits [T, Q, n_way] of the flattened query features."""
        weight = state["weight"]
        scale = self.scale_for(weight.shape[1])
        return head_logits(self.head_kind, query.flatten(2), weight, state.get("bias"), scale)
