"""Optimizee problems as a task distribution the trainer samples (for `algorithm=l2o`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metalearn.l2o.problems import ProblemBatch, ProblemFamily
from metalearn.objectives import AlgorithmsOwn
from metalearn.tasks import Split


class ProblemTasks:
    """A distribution of optimizee problems (`family`, e.g. metalearn.l2o.problems.Quadratic): a task is
    one problem. The splits draw from the same distribution; the trainer's fixed validation and test
    sets come from their own seeds, so they are held-out problems."""

    # The optimizee's loss at the end of the horizon, lower is better; the learned optimizer's meta-loss
    # is the mean optimizee loss over the unroll.
    objective = AlgorithmsOwn("final_loss", higher_is_better=False)
    batch_type = ProblemBatch

    def __init__(self, family: ProblemFamily[Any]) -> None:
        if not all(callable(getattr(family, name, None)) for name in ("sample", "initial_params", "loss")):
            raise TypeError(f"family={type(family).__name__}: not an optimizee family (sample, initial_params, loss)")
        self.family = family

    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> Any:
        return self.family.sample(batch_size, generator)

    def check_model(self, model: nn.Module, predicts_targets: bool) -> None:
        """Raise ValueError if the model is not an update rule (a learned optimizer)."""
        if not (callable(getattr(model, "initial_state", None)) and callable(model)):
            raise ValueError(f"{type(model).__name__} is not an optimizer: use model=lstm_optimizer")
