"""The interface every meta-learning algorithm implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from metalearn.algorithms.functional import Params, buffers_of, forward_with
from metalearn.checks import true_false_auto
from metalearn.models.norm import set_adaptation_step
from metalearn.objectives import Objective
from metalearn.tasks import Illustrated, Task, TaskBatch, TaskSampler


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


class MetaAlgorithm(nn.Module, ABC):
    """A meta-learner. It owns the model and every meta-parameter, so `parameters()` and
    `state_dict()` cover all that the outer loop learns.

    `model_predicts_targets` says whether the model's outputs are the task's predictions (one per
    class or target value, checked against the dataset before training) or an embedding that the
    algorithm turns into predictions (metric-based methods).

    Args:
        model: the base model; never mutated by adaptation.
        objective: the task family's loss and metric.
    """

    model_predicts_targets: ClassVar[bool] = True
    # What `meta_train_step` takes: "episodes" (a TaskBatch, the default), "pairs" (a PairBatch) or
    # "labeled" (a LabeledBatch of all training classes); see `metalearn.tasks.TrainingBatches`.
    # Evaluation is always on episodes.
    train_batches: str = "episodes"
    # True for algorithms that update their meta-parameters themselves inside `meta_train_step` (a TRPO
    # step, several optimizer steps): the trainer then takes no optimizer step of its own and logs
    # `update_norm` (the length of the update) as the gradient norm.
    steps_itself: bool = False
    # What the algorithm learns from: "examples" (episodes of a dataset), "environments" (metalearn.rl)
    # or "optimizees" (problems for a learned optimizer, metalearn.l2o); a dataset says which it gives
    # (`task_kind`, "examples" if it does not say).
    task_kind: ClassVar[str] = "examples"
    reinforcement: ClassVar[bool] = False  # learns policies (environments); its meta-loss is −return
    update_norm: float = 0.0

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        # Whether meta_train_step measures the pre-adaptation query metrics (meta_loss_pre, score_pre).
        # They cost a forward pass of the query set that trains nothing, so the trainer asks for them
        # only on the steps it logs; when False they are NaN. Evaluation always measures them.
        self.measure_pre_adaptation = True

    def setup(self, tasks: TaskSampler) -> None:
        """Called once after construction, before the optimizer is built and any checkpoint is loaded,
        with the task distribution. Algorithms whose meta-parameters depend on the data (the input
        shape of a relation module, the number of classes of a pre-training head) create them here.
        No-op by default."""

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by the trainer with its meta-optimizer, for algorithms that step it themselves
        (`steps_itself`). No-op by default."""

    def illustrate(self, tasks: TaskSampler, generator: torch.Generator) -> Figure | None:
        """A picture of what was learned on a few tasks drawn from `generator`, or None. By default the
        task family's own (`Illustrated`), from the predictions before and after adaptation."""
        if isinstance(tasks, Illustrated):
            return tasks.illustrate(self.predict, generator)
        return None

    def use_compile(self, compile: bool | str, device: torch.device) -> bool:
        """Compile the algorithm's per-task computation with torch.compile: true, false or "auto"
        (where it is measured to be faster on `device`). Returns whether it compiles. By default there
        is no compiled path: false and auto are accepted, true is refused."""
        if true_false_auto("compile", compile) is True:
            raise ValueError(f"compile=true: {type(self).__name__} has no compiled path; use auto or false")
        return False

    def set_progress(self, step: int, max_steps: int) -> None:
        """Called by the trainer before each meta-training step with the 0-based index of that step.

        Algorithms with schedules (annealed loss weights or step sizes, first order for the early
        steps) derive them from this alone, so a resumed run follows the same schedule. No-op by default.
        """

    @abstractmethod
    def adapt(self, task: Task, *, create_graph: bool = False, steps: int | None = None) -> Params:
        """Run the inner loop on the task's support set; return the adapted parameters."""

    @abstractmethod
    def meta_train_step(self, batch: TaskBatch) -> StepResult:
        """Compute the outer objective on `batch` and fill `.grad` of the meta-parameters.
        Never steps an optimizer."""

    @abstractmethod
    def evaluate(self, batch: TaskBatch) -> TaskScores:
        """Adapt to each task without building a graph and score its query set."""

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
