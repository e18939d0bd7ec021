"""Learning to learn by gradient descent by gradient descent (Andrychowicz et al., 2016).

The model is a learned optimizer (metalearn.l2o.optimizer.LSTMOptimizer); a task is an optimizee
problem (metalearn.l2o.problems). One meta-training step optimises a meta-batch of problems for
`horizon` steps with the learned optimizer, in segments of `unroll_length` steps: after each segment
the mean optimizee loss over the segment is backpropagated through the unrolled optimisation and the
trainer's optimizer updates the learned optimizer (truncated backpropagation through time, Section 3),
so one trainer step takes horizon / unroll_length optimizer steps. As in the paper, the optimizee's
gradients enter the learned optimizer as inputs: no second derivatives of the optimizee.

Evaluation optimises each held-out problem for `eval_horizon` steps (by default `horizon`) and reports
the final loss (`final_loss`; "before adaptation": the initial loss), the mean loss over the run
(`mean_loss`) and the final loss of each hand-designed optimizer at its tuned learning rate on the
same problems (`final_loss_sgd`, `_momentum`, `_rmsprop`, `_adam`). The picture at the end of a run
compares the learned optimizer with them over twice the training horizon (the paper's
longer-horizon check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from metalearn.algorithms.base import SelfUpdating, StepResult, TaskScores
from metalearn.checks import positive_int
from metalearn.l2o.optimizer import UpdateRule
from metalearn.l2o.problems import ProblemBatch, ProblemFamily
from metalearn.l2o.unroll import SGD, Adam, Momentum, RMSprop, meta_train_truncated, tune_learning_rate, unroll
from metalearn.objectives import Objective
from metalearn.tasks import TaskSampler

BASELINES: dict[str, Callable[[float], UpdateRule]] = {"SGD": SGD, "Momentum": Momentum, "RMSprop": RMSprop,
                                                       "Adam": Adam}
# Learning rates the baselines are tuned over: 10^-4 … 10^1 in half decades.
TUNING_LRS = tuple(10 ** (k / 2) for k in range(-8, 3))
TUNING_SEED = 7  # the tuning problems' seed: their own draw, never the validation or test problems'


class LearnedOptimizer(SelfUpdating[ProblemBatch]):
    """Meta-trains a learned optimizer on a distribution of optimizee problems.

    Args:
        model: the learned optimizer (an update rule with `initial_state`).
        objective: the problems' objective (final loss).
        horizon: optimisation steps per problem in meta-training (100 in the paper).
        unroll_length: steps per truncated segment (20 in the paper).
        eval_horizon: optimisation steps at evaluation (default: `horizon`).
        tuning_problems: problems the baselines' learning rates are tuned on.
        picture_problems: held-out problems the picture's mean loss curves average over.
    """

    learns_from: ClassVar[type] = ProblemBatch
    model_predicts_targets = False

    def __init__(self, model: nn.Module, objective: Objective, horizon: int = 100, unroll_length: int = 20,
                 eval_horizon: int | None = None, tuning_problems: int = 100, picture_problems: int = 100) -> None:
        super().__init__(model, objective)
        self.horizon = positive_int("horizon", horizon)
        self.unroll_length = positive_int("unroll_length", unroll_length)
        self.eval_horizon = positive_int("eval_horizon", eval_horizon or horizon)
        self.tuning_problems = positive_int("tuning_problems", tuning_problems)
        self.picture_problems = positive_int("picture_problems", picture_problems)
        self.family: ProblemFamily[Any] | None = None
        self._tuned: dict[str, float] | None = None

    def setup(self, tasks: TaskSampler) -> None:
        family = getattr(tasks, "family", None)
        if family is None:
            raise ValueError(f"trains an optimizer on optimizee problems; the dataset ({type(tasks).__name__}) "
                             "gives none (dataset=quadratic)")
        self.family = family

    def _family(self) -> ProblemFamily[Any]:
        if self.family is None:
            raise RuntimeError("LearnedOptimizer.setup(tasks) was not called")
        return self.family

    @property
    def rule(self) -> UpdateRule:
        return self.model  # type: ignore[return-value]

    def update(self, batch: ProblemBatch, optimizer: torch.optim.Optimizer) -> tuple[StepResult, float]:
        """Truncated backpropagation through the optimisation of `batch` over `horizon` steps: one
        `optimizer` step on the learned rule's weights per unrolled segment."""
        before = torch.cat([p.detach().reshape(-1) for p in self.parameters()]).clone()
        segment_losses: list[float] = []

        def step(meta_loss: Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            meta_loss.backward()
            optimizer.step()
            segment_losses.append(float(meta_loss.detach()))

        losses = meta_train_truncated(self.rule, self._family(), batch, self.horizon, self.unroll_length, step)
        optimizer.zero_grad(set_to_none=True)
        norm = float((torch.cat([p.detach().reshape(-1) for p in self.parameters()]) - before).norm())
        final, initial = losses[-1].mean().item(), losses[0].mean().item()
        mean = sum(segment_losses) / len(segment_losses)
        return StepResult(meta_loss=mean, meta_loss_pre=initial, score=final, score_pre=initial), norm

    def optimise(self, batch: ProblemBatch, rule: UpdateRule | None = None, steps: int | None = None) -> Tensor:
        """Losses f(θ_0) … f(θ_steps) [steps + 1, B] of `rule` (the learned optimizer by default)."""
        family = self._family()
        with torch.no_grad():
            losses, _, _ = unroll(rule or self.rule, family, batch, family.initial_params(batch),
                                  steps or self.eval_horizon, create_graph=False)
        return losses

    def tuned_learning_rates(self) -> dict[str, float]:
        """Each baseline's learning rate among TUNING_LRS with the lowest mean loss after `horizon` steps on
        `tuning_problems` problems of their own (seed TUNING_SEED); tuned once, on first use."""
        if self._tuned is None:
            family = self._family()
            tuning = family.sample(self.tuning_problems, torch.Generator().manual_seed(TUNING_SEED))
            self._tuned = {name: tune_learning_rate(family, make, TUNING_LRS, self.horizon, tuning)
                           for name, make in BASELINES.items()}
        return self._tuned

    def evaluate(self, batch: ProblemBatch) -> TaskScores:
        """The learned optimizer's final and mean loss on each problem, and each tuned baseline's final loss
        on the same problems (`final_loss_sgd`, `final_loss_momentum`, `final_loss_rmsprop`, `final_loss_adam`)."""
        losses = self.optimise(batch)
        final, initial = losses[-1], losses[0]
        extra = {"mean_loss": losses[1:].mean(0)}
        for name, lr in self.tuned_learning_rates().items():
            extra[f"final_loss_{name.lower()}"] = self.optimise(batch, BASELINES[name](lr))[-1]
        return TaskScores(loss=final, loss_pre=initial, score=final, score_pre=initial, extra=extra)

    def compare(self, tasks: TaskSampler, generator: torch.Generator, problems: int | None = None,
                steps: int | None = None) -> dict[str, Tensor]:
        """Mean loss curves [steps + 1] over `problems` (default `picture_problems`) held-out problems of the
        learned optimizer and of each baseline at its tuned learning rate (`tuned_learning_rates`)."""
        steps = steps or 2 * self.horizon
        held_out = cast(ProblemBatch, tasks.sample(problems or self.picture_problems, "test", generator))
        curves = {"learned (LSTM)": self.optimise(held_out, steps=steps).mean(1)}
        for name, lr in self.tuned_learning_rates().items():
            curves[f"{name} (lr {lr:.3g})"] = self.optimise(held_out, BASELINES[name](lr), steps).mean(1)
        return curves

    def illustrate(self, tasks: TaskSampler, generator: torch.Generator) -> Figure | None:
        curves = self.compare(tasks, generator)
        figure = Figure(figsize=(7, 4.5))
        ax = figure.subplots()
        for name, curve in curves.items():
            ax.plot(range(len(curve)), curve.clamp_min(1e-12).numpy(), label=name)
        ax.axvline(self.horizon, color="grey", linestyle=":", label=f"training horizon ({self.horizon})")
        ax.set_yscale("log")
        ax.set_xlabel("optimisation step")
        ax.set_ylabel("mean loss on held-out problems")
        ax.set_title(f"{type(self._family()).__name__}: learned optimizer against tuned baselines")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figure.tight_layout()

        return figure
