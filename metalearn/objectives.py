"""What a task family asks a model to do: its loss and its headline metric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class Objective(Protocol):
    """Loss to train on and the metric to report, both pure tensor functions (safe under vmap)."""

    @property
    def metric(self) -> str:
        """Short name of the headline metric (`mse`, `acc`)."""
        ...

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger headline metric is better."""
        ...

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Mean loss over the examples of one task."""
        ...

    def score(self, prediction: Tensor, target: Tensor) -> Tensor:
        """The headline metric of one task (a scalar tensor)."""
        ...


def at_least_float32(tensor: Tensor) -> Tensor:
    """`tensor` in float32 if it is in a reduced precision (bfloat16 or float16 under autocast), else
    unchanged (float64 stays float64): losses and distances are computed at full precision."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


@dataclass(frozen=True)
class Regression:
    """Mean squared error; the reported metric is the MSE itself."""

    metric: str = "mse"
    higher_is_better: bool = False

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(at_least_float32(prediction), at_least_float32(target))

    def score(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(at_least_float32(prediction), at_least_float32(target))


@dataclass(frozen=True)
class Classification:
    """Cross-entropy over class logits; the reported metric is accuracy."""

    metric: str = "acc"
    higher_is_better: bool = True

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(at_least_float32(prediction), target)

    def score(self, prediction: Tensor, target: Tensor) -> Tensor:
        return (prediction.argmax(dim=-1) == target).to(torch.float32).mean()


@dataclass(frozen=True)
class AlgorithmsOwn:
    """An objective whose losses are the algorithm's own (a policy's surrogate of −return, an unrolled
    optimisation's losses): only the headline metric's name and direction, no loss of a prediction."""

    metric: str
    higher_is_better: bool

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        raise TypeError(f"the {self.metric} objective has no loss of a prediction: the algorithm computes its own")

    def score(self, prediction: Tensor, target: Tensor) -> Tensor:
        raise TypeError(f"the {self.metric} objective has no score of a prediction: the algorithm computes its own")
