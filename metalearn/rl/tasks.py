"""Task distributions of environments: what the trainer samples for meta-reinforcement learning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from metalearn.objectives import AlgorithmsOwn
from metalearn.rl.envs import BatchEnv
from metalearn.tasks import Split, derived_seed


@dataclass(frozen=True)
class EnvTaskBatch:
    """A meta-batch of environment tasks: each task's parameters and a seed for all its randomness
    (episodes' noise and initial states), drawn from the trainer's generator."""

    kind: ClassVar[str] = "environments"

    params: Tensor  # [B, param_size]
    seeds: Tensor  # [B] int64

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, i: int | slice) -> EnvTaskBatch:
        rows = slice(i, i + 1) if isinstance(i, int) else i
        return EnvTaskBatch(self.params[rows], self.seeds[rows])

    def to(self, device: torch.device | str) -> EnvTaskBatch:
        return self  # environments step on the CPU; policies move observations themselves

    def generators(self, purpose: int = 0) -> list[torch.Generator]:
        """One generator per task, from its seed and `purpose` (which rollout of the task it serves)."""
        return [torch.Generator().manual_seed(derived_seed(int(s), purpose)) for s in self.seeds]

    @staticmethod
    def cat(batches: Sequence[EnvTaskBatch]) -> EnvTaskBatch:
        return EnvTaskBatch(torch.cat([b.params for b in batches]), torch.cat([b.seeds for b in batches]))


class EnvTasks:
    """A distribution of environments of one family (`env`): a task is its parameter vector.

    The splits draw from the same distribution (as in the papers); the trainer's fixed validation
    and test sets come from their own seeds, so they never coincide with training tasks' draws.

    Args:
        env: the environment family (`metalearn.rl.envs.BatchEnv`).
        observation_size: what the policy sees, as the config declares it for the model to follow; must
            be the environment's (None: not checked).
        action_size: the size of an action (continuous) or the number of actions (discrete), likewise.
        discrete: whether actions are discrete, likewise.
    """

    # The undiscounted episode return, higher is better; the losses are the algorithms' (−return surrogates).
    objective = AlgorithmsOwn("return", higher_is_better=True)
    batch_type = EnvTaskBatch

    def __init__(self, env: BatchEnv, observation_size: int | None = None, action_size: int | None = None,
                 discrete: bool | None = None) -> None:
        if not isinstance(env, BatchEnv):
            raise TypeError(f"env={type(env).__name__}: not an environment family (metalearn.rl.envs.BatchEnv)")
        # The sizes a config declares for the policy network to follow; they must be the environment's.
        for name, declared, actual in (("observation_size", observation_size, env.observation_size),
                                       ("action_size", action_size, env.action_size),
                                       ("discrete", discrete, env.discrete)):
            if declared is not None and declared != actual:
                raise ValueError(f"{name}={declared}: the environment ({type(env).__name__}) has {actual}")
        self.env = env
        self.output_size = env.action_size
        self.input_size = env.observation_size

    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> EnvTaskBatch:
        params = self.env.sample_params(batch_size, generator)
        return EnvTaskBatch(params, torch.randint(0, 2**62, (batch_size,), generator=generator))

    def check_model(self, model: nn.Module, predicts_targets: bool) -> None:
        """Raise ValueError naming the model's sizes if it cannot act in this environment."""
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, self.env.observation_size))
        except RuntimeError as ex:
            raise ValueError(f"cannot take the environment's observations of size {self.env.observation_size} "
                             f"(set model.in_features={self.env.observation_size}; {str(ex).splitlines()[0]})"
                             ) from ex
        out = out[0] if isinstance(out, tuple) else out
        if predicts_targets and out.shape[-1] != self.env.action_size:
            raise ValueError(f"outputs {out.shape[-1]} values but the environment has "
                             f"{self.env.action_size} {'actions' if self.env.discrete else 'action dimensions'} "
                             f"(set model.out_features={self.env.action_size})")
