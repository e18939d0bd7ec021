"""The contract between a meta-learner and the trainer, and the protocol of gradient-based few-shot learners.

The trainer needs four things of a learner (`MetaLearner`): draw its training batch from the task
family, take one training step on it, evaluate a batch of tasks, and its state (`state_dict`). How a
step updates the meta-parameters is one of two contracts:

- `GradientLearner`: `meta_train_step` fills the meta-parameters' `.grad`; the trainer averages them
  across processes, clips them and steps its optimizer (MAML and its variants, metric learners, RL²);
- `SelfUpdating`: `update` takes the whole update itself with the trainer's optimizer or its own rule
  (MAML-RL's TRPO and PPO steps, the learned optimizer's truncated unrolls).

Each paradigm is a base class beside these, in its own module: `FewShotLearner` here (adapts its
parameters to a support set: `adapt`), `metric.MetricLearner` (fits a classifier on support
embeddings), `policy.PolicyLearner` (policies on environment families, metalearn.rl) and
`l2o.LearnedOptimizer` (update rules over optimizee problems, metalearn.l2o). A learner says which task
batches it learns from (`learns_from`); a task family says which it draws (`batch_type`), and the two
are checked before anything is built (metalearn.compose).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from metalearn.algorithms.functional import Params, buffers_of, forward_with
from metalearn.checks import true_false_auto
from metalearn.models.norm import set_adaptation_step
from metalearn.objectives import Objective
from metalearn.tasks import Illustrated, Task, TaskBatch, TaskSampler

B = TypeVar("B")  # the batch type a learner trains on


@dataclass(frozen=True)
class StepResult:
    """Detached metrics of one meta-training step, each a mean over the meta-batch.

    Attributes:
        meta_loss: query loss after adaptation (the outer objective that was differentiated).
        meta_loss_pre: query loss before adaptation.
        score: the objective's headline metric on the query set after adaptation.
        score_pre: the same metric before adaptation.
    """

    meta_loss: float
    meta_loss_pre: float
    score: float
    score_pre: float


@dataclass(frozen=True)
class TaskScores:
    """Per-task evaluation results, each a tensor with one value per task; `extra` holds further
    per-task metrics an algorithm reports (e.g. the return after each adaptation step)."""

    loss: Tensor
    loss_pre: Tensor
    score: Tensor
    score_pre: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: list[TaskScores]) -> TaskScores:
        """Concatenate the per-task values of several evaluations."""
        names = ("loss", "loss_pre", "score", "score_pre")
        extra = {key: torch.cat([p.extra[key] for p in parts]) for key in parts[0].extra}
        loss, loss_pre, score, score_pre = (torch.cat([getattr(p, name) for p in parts]) for name in names)
        return TaskScores(loss, loss_pre, score, score_pre, extra)


class MetaLearner(nn.Module, ABC, Generic[B]):
    """What the trainer needs of a meta-learner. It owns the model and every meta-parameter, so
    `parameters()` and `state_dict()` cover all that the outer loop learns. `B` is the type of the
    batches it trains on (`draw`); evaluation is on the task family's own batches (`learns_from`).

    Args:
        model: the base model; never mutated by adaptation.
        objective: the task family's loss and metric.
    """

    # Whether the model's outputs are the task's predictions (one per class or target value, checked
    # against the dataset before training) or something the learner turns into predictions (an embedding,
    # a policy's action distribution, an update rule's step).
    model_predicts_targets: ClassVar[bool] = True
    # The batch type of the task families it learns from (a task family's `batch_type`).
    learns_from: ClassVar[type] = TaskBatch

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        # Whether a training step measures the pre-adaptation query metrics (meta_loss_pre, score_pre).
        # They cost a forward pass of the query set that trains nothing, so the trainer asks for them
        # only on the steps it logs; when False they are NaN. Evaluation always measures them.
        self.measure_pre_adaptation = True

    def setup(self, tasks: TaskSampler) -> None:
        """Called once after construction, before the optimizer is built and any checkpoint is loaded,
        with the task distribution. Learners whose meta-parameters depend on the data (the input shape
        of a relation module, the number of classes of a pre-training head) create them here, and a
        learner refuses (ValueError) a task family it cannot train on. No-op by default."""

    def draw(self, tasks: TaskSampler, batch_size: int, generator: torch.Generator) -> B:
        """The training batch of one step: `batch_size` tasks of the training split by default (a learner
        that trains on something else, pairs or labelled minibatches, draws that here)."""
        return tasks.sample(batch_size, "train", generator)  # type: ignore[return-value]

    def illustrate(self, tasks: TaskSampler, generator: torch.Generator) -> Figure | None:
        """A picture of what was learned on a few tasks drawn from `generator`, or None (the default)."""
        return None

    def use_compile(self, compile: bool | str, device: torch.device) -> bool:
        """Compile the learner's per-task computation with torch.compile: true, false or "auto" (where it
        is measured to be faster on `device`). Returns whether it compiles. By default there is no
        compiled path: false and auto are accepted, true is refused."""
        if true_false_auto("compile", compile) is True:
            raise ValueError(f"compile=true: {type(self).__name__} has no compiled path; use auto or false")
        return False

    def set_progress(self, step: int, max_steps: int) -> None:
        """Called by the trainer before each meta-training step with the 0-based index of that step.

        Learners with schedules (annealed loss weights or step sizes, first order for the early steps)
        derive them from this alone, so a resumed run follows the same schedule. No-op by default.
        """

    @abstractmethod
    def evaluate(self, batch: Any) -> TaskScores:
        """Adapt to each task of a batch of the task family (`learns_from`) without building a graph and
        score it."""


class GradientLearner(MetaLearner[B]):
    """A learner whose step computes the meta-gradient; the trainer's optimizer applies it."""

    @abstractmethod
    def meta_train_step(self, batch: B) -> StepResult:
        """Compute the outer objective on `batch` and fill `.grad` of the meta-parameters. Never steps
        an optimizer."""


class SelfUpdating(MetaLearner[B]):
    """A learner that updates its meta-parameters itself in a step (a trust-region step, several
    optimizer steps). It runs in one process, and the trainer neither clips nor steps for it."""

    @abstractmethod
    def update(self, batch: B, optimizer: torch.optim.Optimizer) -> tuple[StepResult, float]:
        """Train on `batch`, updating the meta-parameters (with `optimizer`, the trainer's, where the
        learner's rule uses one); return the step's metrics and the length of the update."""


class FewShotLearner(GradientLearner[TaskBatch]):
    """Gradient-based few-shot learning (MAML and its variants): adapt the model's parameters to a
    task's support set (`adapt`), score the adapted model on its query set."""

    @abstractmethod
    def adapt(self, task: Task, *, create_graph: bool = False, steps: int | None = None) -> Params:
        """Run the inner loop on the task's support set; return the adapted parameters."""

    def predict(self, task: Task, x: Tensor) -> tuple[Tensor, Tensor]:
        """Predictions on `x` before and after adapting to `task` (for pictures and inspection)."""
        buffers = buffers_of(self.model)
        adapted = self.adapt(task)
        with torch.no_grad():
            set_adaptation_step(self.model, 0)
            before = self.model(x)
            set_adaptation_step(self.model, None)
            after = forward_with(self.model, adapted, buffers, x)
        return before, after

    def illustrate(self, tasks: TaskSampler, generator: torch.Generator) -> Figure | None:
        """The task family's own picture (`Illustrated`) of the predictions before and after adaptation."""
        return illustrated(tasks, self.predict, generator)


def illustrated(tasks: TaskSampler, predict: Any, generator: torch.Generator) -> Figure | None:
    """`tasks.illustrate(predict, generator)` for a task family that draws pictures (`Illustrated`), else None."""
    return tasks.illustrate(predict, generator) if isinstance(tasks, Illustrated) else None
