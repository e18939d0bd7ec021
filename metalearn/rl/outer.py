"""Outer steps of policy-gradient meta-learning: how MAML-RL turns the post-adaptation surrogate into an
update of the meta-parameters. The `algorithm/outer` config group chooses one (trpo, ppo, vpg).

Each step gets the meta-parameters, a function that re-adapts from their current values and returns the
`Surrogate` terms of the post-adaptation trajectories (with graphs through the inner steps), and the
trainer's optimizer; it updates the parameters and returns the length of what it did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from metalearn.checks import positive_float, positive_int
from metalearn.rl.trpo import trpo_update


@dataclass(frozen=True)
class Surrogate:
    """The post-adaptation terms, task-major [B, T, E] (tasks, time, episodes): the importance ratios
    new/old of the actions taken, their advantages, the KL(old ‖ new) of each step's action distribution,
    and the mask of steps inside an episode. Each objective is a mean over a task's steps, then over tasks."""

    ratio: Tensor
    advantages: Tensor
    kl: Tensor
    mask: Tensor

    def mean(self, values: Tensor) -> Tensor:
        """Mean over each task's steps, then over tasks."""
        count = self.mask.sum((1, 2)).clamp_min(1.0)
        return ((values * self.mask).sum((1, 2)) / count).mean()

    def objective(self) -> Tensor:
        """The importance-weighted surrogate of the returns, mean ratio · A."""
        return self.mean(self.ratio * self.advantages)

    def clipped(self, clip: float) -> Tensor:
        """PPO's clipped surrogate (Schulman et al., 2017) with clipping range `clip`."""
        ratio, advantages = self.ratio, self.advantages
        return self.mean(torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages))

    def mean_kl(self) -> Tensor:
        return self.mean(self.kl)


class OuterStep(Protocol):
    """An outer update rule for MAML-RL."""

    def __call__(self, params: Sequence[Tensor], surrogate: Callable[[], Surrogate],
                 optimizer: torch.optim.Optimizer) -> float:
        """Update `params` in place towards a larger surrogate; return the update's length."""


class TRPO:
    """The MAML paper's outer step: conjugate gradient on Fisher-vector products of the mean KL between
    the adapted policies before and after the step (products that run through the inner steps), the step
    scaled to `max_kl`, then a backtracking line search that keeps it only if the surrogate improves within
    the KL bound. The trainer's optimizer is not used.

    Args:
        max_kl: the bound on the mean KL of a step.
        cg_iterations, cg_damping: conjugate gradient's iterations and the damping added to F.
        line_search_steps, line_search_backtrack: the line search's tries and its shrink factor.
    """

    def __init__(self, max_kl: float = 0.01, cg_iterations: int = 10, cg_damping: float = 1e-5,
                 line_search_steps: int = 15, line_search_backtrack: float = 0.8) -> None:
        self.max_kl = positive_float("max_kl", max_kl)
        self.cg_iterations = positive_int("cg_iterations", cg_iterations)
        if not (math.isfinite(cg_damping) and cg_damping >= 0):
            raise ValueError(f"cg_damping={cg_damping!r}: must be a finite number >= 0")
        self.cg_damping = float(cg_damping)
        self.line_search_steps = positive_int("line_search_steps", line_search_steps)
        if not 0 < line_search_backtrack < 1:
            raise ValueError(f"line_search_backtrack={line_search_backtrack!r}: must be in (0, 1)")
        self.line_search_backtrack = float(line_search_backtrack)

    def __call__(self, params: Sequence[Tensor], surrogate: Callable[[], Surrogate],
                 optimizer: torch.optim.Optimizer) -> float:
        norm = trpo_update(params, lambda: -surrogate().objective(), lambda: surrogate().mean_kl(), self.max_kl,
                           self.cg_damping, self.cg_iterations, self.line_search_backtrack,
                           self.line_search_steps).step_norm
        for p in params:
            p.grad = None
        return norm


class PPO:
    """`epochs` steps of the trainer's optimizer on PPO's clipped surrogate, each re-adapting from the
    current meta-parameters. Returns the length of the whole update.

    Args:
        clip: the clipping range of the importance ratio.
        epochs: optimizer steps per meta-batch.
    """

    def __init__(self, clip: float = 0.2, epochs: int = 5) -> None:
        self.clip = positive_float("clip", clip)
        self.epochs = positive_int("epochs", epochs)

    def __call__(self, params: Sequence[Tensor], surrogate: Callable[[], Surrogate],
                 optimizer: torch.optim.Optimizer) -> float:
        before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        for _ in range(self.epochs):
            optimizer.zero_grad(set_to_none=True)
            (-surrogate().clipped(self.clip)).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float((torch.cat([p.detach().reshape(-1) for p in params]) - before).norm())


class VPG:
    """The meta-gradient of the surrogate, one step of the trainer's optimizer. Returns the gradient's norm."""

    def __call__(self, params: Sequence[Tensor], surrogate: Callable[[], Surrogate],
                 optimizer: torch.optim.Optimizer) -> float:
        optimizer.zero_grad(set_to_none=True)
        (-surrogate().objective()).backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], math.inf).item()
        optimizer.step()
        return norm
