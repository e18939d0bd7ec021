"""A recurrent policy for RL² (Duan et al., 2016; Wang et al., 2016)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.checks import positive_int


class RecurrentPolicy(nn.Module):
    """A GRU that reads, at every step, the observation, the previous action (one-hot if discrete),
    the previous reward and whether the previous step ended an episode, and outputs the action's
    logits (discrete) or mean (continuous, with a learned state-independent log standard deviation)
    and a value estimate. Its hidden state is carried across the episodes of a trial, so that it can
    learn to adapt to the task from its own experience.

    Args:
        observation_size / action_size: the environment's (actions: their number if discrete).
        discrete: whether actions are discrete.
        hidden: GRU units.
        init_std: initial standard deviation of continuous actions.
    """

    recurrent = True

    def __init__(self, observation_size: int, action_size: int, discrete: bool, hidden: int = 256,
                 init_std: float = 1.0) -> None:
        super().__init__()
        self.observation_size = positive_int("observation_size", observation_size)
        self.action_size = positive_int("action_size", action_size)
        self.discrete = discrete
        self.hidden = positive_int("hidden", hidden)
        if not init_std > 0:
            raise ValueError(f"init_std={init_std}: must be > 0")
        self.input_size = observation_size + action_size + 2
        self.cell = nn.GRUCell(self.input_size, hidden)
        self.policy = nn.Linear(hidden, action_size)
        self.value = nn.Linear(hidden, 1)
        self.log_std = None if discrete else nn.Parameter(torch.full((action_size,), math.log(init_std)))
        with torch.no_grad():  # small initial policy outputs: near-uniform or near-zero-mean actions
            self.policy.weight.mul_(0.01)
            self.policy.bias.zero_()

    def initial_state(self, n: int) -> Tensor:
        return torch.zeros(n, self.hidden, device=self.policy.weight.device)

    def encode(self, observation: Tensor, action: Tensor, reward: Tensor, done: Tensor) -> Tensor:
        """The step's input: observation, previous action (discrete: one-hot; index `action_size` for
        none, at the start of a trial), previous reward, previous done flag."""
        if self.discrete:  # action index `action_size` means none yet (the trial's first step): all zeros
            previous = F.one_hot(action.long(), self.action_size + 1)[..., :-1].to(observation.dtype)
        else:
            previous = action.to(observation.dtype)
        return torch.cat([observation, previous, reward.unsqueeze(-1), done.unsqueeze(-1).to(observation.dtype)], -1)

    def step(self, inputs: Tensor, state: Tensor, alive: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One step for a batch: (policy outputs, values, next state); rows that are not `alive` keep
        their state (the step after an episode ended early, waiting for the next episode)."""
        new_state = self.cell(inputs, state)
        if alive is not None:
            new_state = torch.where(alive.unsqueeze(-1), new_state, state)
        return self.policy(new_state), self.value(new_state).squeeze(-1), new_state

    def unroll(self, inputs: Tensor, alive: Tensor) -> tuple[Tensor, Tensor]:
        """Policy outputs [S, N, A] and values [S, N] of whole sequences `inputs` [S, N, input_size]."""
        state = self.initial_state(inputs.shape[1])
        outputs, values = [], []
        for t in range(len(inputs)):
            out, value, state = self.step(inputs[t], state, alive[t])
            outputs.append(out)
            values.append(value)
        return torch.stack(outputs), torch.stack(values)

    def forward(self, observation: Tensor) -> Tensor:
        """The first step of a trial from `observation` (no previous action): policy outputs."""
        n = observation.shape[0]
        inputs = self.encode(observation, torch.full((n,), self.action_size) if self.discrete
                             else torch.zeros(n, self.action_size), torch.zeros(n), torch.zeros(n))
        return self.step(inputs, self.initial_state(n))[0]
