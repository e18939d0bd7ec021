"""Meta-SGD: MAML whose inner learning rates are meta-learned, one per parameter entry.

The inner step is `p - alpha * grad` with `alpha` a tensor of the parameter's shape, learned in the
outer loop together with the initialisation. `alpha` fixes both the size and the direction of the
update of every entry (nothing keeps it positive).

References:
    Li, Z., Zhou, F., Chen, F. and Li, H. (2017). Meta-SGD: Learning to Learn Quickly for Few-Shot
    Learning. arXiv preprint. https://arxiv.org/abs/1707.09835
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metalearn.algorithms.maml import MAML
from metalearn.objectives import Objective


def lr_key(name: str) -> str:
    """The key of parameter `name`'s learning rate in the ParameterDict: module keys cannot contain
    '.', and '-' never occurs in a name registered by attribute assignment."""
    return name.replace(".", "-")


def init_range(value: Sequence[float] | None, constant: float) -> tuple[float, float]:
    """`init_lr_range` checked as a pair 0 <= low <= high of finite numbers; None: [constant, constant]."""
    if value is None:
        return constant, constant
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = math.nan  # not a pair of numbers: reported below
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
        raise ValueError(f"init_lr_range={value!r}: must be a pair [low, high] of finite numbers with 0 <= low <= high")
    return low, high


class MetaSGD(MAML):
    """MAML with a learned learning-rate tensor per model parameter (the paper's alpha).

    The rates are parameters of this module (`lrs`, one entry per model parameter, keyed by `lr_key`),
    so the optimizer learns them and checkpoints hold them. The same rates serve every inner step,
    as in the paper, and scale the inner optimizer's direction (the gradient for sgd).

    Args:
        model: the base model whose initialisation is meta-learned.
        objective: the task family's loss and metric.
        init_lr_range: [low, high]; every rate starts uniform in it (the paper draws U[0.005, 0.1]).
            Drawn from torch's global generator, as nn.Module initialisations are, so the run's seed
            fixes them. [a, a] starts every rate at a. None: start every rate at `inner_lr`.
        **maml_args: MAML's other arguments (inner_lr is used only when init_lr_range is None).
    """

    def __init__(
        self, model: nn.Module, objective: Objective, init_lr_range: Sequence[float] | None = (0.005, 0.1),
        **maml_args: Any,
    ) -> None:
        super().__init__(model, objective, **maml_args)
        low, high = init_range(init_lr_range, self.inner_lr)
        names = [name for name, _ in model.named_parameters()]
        if len({lr_key(name) for name in names}) != len(names):
            raise ValueError(f"model: parameter names {names} collide once '.' is replaced by '-'")
        with torch.no_grad():
            self.lrs = nn.ParameterDict({
                lr_key(name): nn.Parameter(torch.empty_like(p).uniform_(low, high))
                for name, p in model.named_parameters()
            })

    def step_size(self, step: int) -> dict[str, Tensor]:
        """The learned rates by parameter name; the same for every inner step."""
        return {name: self.lrs[lr_key(name)] for name, _ in self.model.named_parameters()}
