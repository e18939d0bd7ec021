"""Task families of environments for meta-reinforcement learning, batched as tensor code.

A task is an environment drawn from a distribution (a goal position, the arms' payout
probabilities, a target velocity), described by a parameter vector. An environment family steps
many episodes at once, each of any task: `reset(params)` starts one episode per row of `params`,
`step(action, noise)` advances all of them. Everything random comes in as pre-drawn uniforms
(`noise`), so a rollout is reproducible from its generator and does not depend on how tasks are
grouped into batches. The rollout (metalearn.rl.rollout) handles the time limit and masks the steps
after an episode has ended.

Each family is also a gymnasium environment (`gymnasium.make("metalearn/Navigation2D-v0")`,
`metalearn/Bandit-v0`): one episode of one task, with the task set by `reset(options={"task": ...})`
or drawn from the reset's seed.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import gymnasium
import numpy as np
import torch
from torch import Tensor

from metalearn.checks import positive_int


@runtime_checkable
class BatchEnv(Protocol):
    """A family of environments that steps a batch of episodes (one per row) as tensors."""

    observation_size: int  # length of an observation vector
    action_size: int  # continuous: length of an action vector; discrete: the number of actions
    discrete: bool
    horizon: int  # the time limit: steps per episode at most
    noise_size: int  # uniforms in [0, 1) that one step of one episode consumes (0: deterministic)
    param_size: int  # length of a task's parameter vector

    def sample_params(self, n: int, generator: torch.Generator) -> Tensor:
        """`n` tasks' parameters, [n, param_size], drawn with `generator` only."""
        ...

    def reset(self, params: Tensor, seeds: Tensor) -> Tensor:
        """Start one episode per row of `params` [N, param_size], each from its seed (`seeds` [N] int64, for
        families with random initial states); the first observations [N, observation_size]."""
        ...

    def step(self, action: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Advance every episode by `action` ([N, action_size] floats, or [N] integers if discrete) with
        `noise` [N, noise_size]: the observations [N, observation_size], rewards [N] and whether each
        episode has terminated [N] (reached an end state; the time limit is the rollout's)."""
        ...


class Navigation2D:
    """2D navigation (Finn et al., 2017, section 5.3): a point starts at the origin and must reach a
    goal drawn uniformly from [goal_low, goal_high]^2. The observation is the position, the action a
    velocity clipped to [-max_action, max_action] per coordinate, the reward the negative Euclidean
    distance to the goal after the move; an episode ends within `success_radius` of the goal or after
    `horizon` steps.

    With `normalized_actions` the policy acts in [-1, 1] units, as in the paper's code (rllab's
    `normalize` wrapper): the velocity is `max_action` times the action clipped to [-1, 1]. The units
    matter to policy-gradient learners: a Gaussian policy's initial standard deviation and the inner
    step size of MAML were tuned for them.

    Args:
        goal_low, goal_high: the range of each goal coordinate.
        max_action: the largest velocity per coordinate and step.
        success_radius: an episode ends this close to the goal.
        horizon: the most steps an episode lasts.
        observe_goal: observe the goal as well as the position (the oracle baseline's observation).
        normalized_actions: actions in [-1, 1] units scaled to `max_action` (the paper's code).
    """

    discrete = False
    observation_size = action_size = param_size = 2
    noise_size = 0

    def __init__(self, goal_low: float = -0.5, goal_high: float = 0.5, max_action: float = 0.1,
                 success_radius: float = 0.01, horizon: int = 100, observe_goal: bool = False,
                 normalized_actions: bool = False) -> None:
        if not goal_low < goal_high:
            raise ValueError(f"goal_low={goal_low}: must be below goal_high={goal_high}")
        if not (max_action > 0 and success_radius >= 0):
            raise ValueError(f"max_action={max_action}, success_radius={success_radius}: must be > 0 and >= 0")
        self.horizon = positive_int("horizon", horizon)
        self.goal_low, self.goal_high = goal_low, goal_high
        self.max_action, self.success_radius = max_action, success_radius
        # The oracle of the paper sees the goal: observation (position, goal).
        self.observe_goal = observe_goal
        self.observation_size = 4 if observe_goal else 2
        self.normalized_actions = normalized_actions
        # The bound of the policy's actions (gymnasium's action space).
        self.action_bound = 1.0 if normalized_actions else max_action
        self._position = self._goal = torch.zeros(0, 2)

    def sample_params(self, n: int, generator: torch.Generator) -> Tensor:
        return self.goal_low + (self.goal_high - self.goal_low) * torch.rand(n, 2, generator=generator)

    def _observe(self) -> Tensor:
        return torch.cat([self._position, self._goal], 1) if self.observe_goal else self._position.clone()

    def reset(self, params: Tensor, seeds: Tensor) -> Tensor:
        self._goal = params.to(torch.float32)
        self._position = torch.zeros_like(self._goal)
        return self._observe()

    def step(self, action: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.normalized_actions:
            velocity = self.max_action * action.clamp(-1.0, 1.0)
        else:
            velocity = action.clamp(-self.max_action, self.max_action)
        self._position = self._position + velocity
        distance = (self._position - self._goal).norm(dim=1)
        return self._observe(), -distance, distance < self.success_radius


class Bandit:
    """Multi-armed Bernoulli bandits (Duan et al., 2016, section 4.1): arm i pays 1 with probability p_i,
    each p_i drawn uniformly from [0, 1]. An episode is one pull (horizon 1); the observation is a
    constant. A learner that adapts plays many episodes of the same task (RL²'s trial) and should
    find the best arm while paying as little as possible for exploring.

    Args:
        arms: the number of arms (the action is the arm pulled).
    """

    discrete = True
    observation_size = 1
    noise_size = 1
    horizon = 1

    def __init__(self, arms: int = 5) -> None:
        self.arms = self.action_size = self.param_size = positive_int("arms", arms)
        self._p = torch.zeros(0, self.arms)

    def sample_params(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.rand(n, self.arms, generator=generator)

    def reset(self, params: Tensor, seeds: Tensor) -> Tensor:
        self._p = params.to(torch.float32)
        return torch.ones(len(params), 1)

    def step(self, action: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        payout = self._p.gather(1, action.long().view(-1, 1)).squeeze(1)
        reward = (noise[:, 0] < payout).to(torch.float32)
        return torch.ones(len(action), 1), reward, torch.ones(len(action), dtype=torch.bool)


class GymnasiumEnv(gymnasium.Env):  # type: ignore[type-arg]
    """One episode of one task of a `BatchEnv` family, behind gymnasium's API.

    The task is `options["task"]` of `reset` (its parameter vector) or, without it, drawn from the
    reset's seed. Randomness of the dynamics comes from the environment's `np_random`.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, family: BatchEnv) -> None:
        self.family = family
        high = np.full(family.observation_size, np.inf, dtype=np.float32)
        self.observation_space = gymnasium.spaces.Box(-high, high, dtype=np.float32)
        if family.discrete:
            self.action_space = gymnasium.spaces.Discrete(family.action_size)
        else:
            bound = float(getattr(family, "action_bound", getattr(family, "max_action", 1.0)))
            self.action_space = gymnasium.spaces.Box(-bound, bound, (family.action_size,), dtype=np.float32)
        self.task = np.zeros(family.param_size, dtype=np.float32)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options and "task" in options:
            self.task = np.asarray(options["task"], dtype=np.float32).reshape(self.family.param_size)
        else:
            generator = torch.Generator().manual_seed(int(self.np_random.integers(2**62)))
            self.task = self.family.sample_params(1, generator)[0].numpy()
        self._t = 0
        seeds = torch.tensor([int(self.np_random.integers(2**62))])
        obs = self.family.reset(torch.from_numpy(self.task).view(1, -1), seeds)
        return obs[0].numpy().astype(np.float32), {"task": self.task.copy()}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.family.discrete:
            act = torch.tensor([int(action)])
        else:
            act = torch.as_tensor(np.asarray(action, dtype=np.float32)).view(1, -1)
        noise = torch.from_numpy(self.np_random.random((1, self.family.noise_size)).astype(np.float32))
        obs, reward, terminated = self.family.step(act, noise)
        self._t += 1
        truncated = self._t >= self.family.horizon and not bool(terminated[0])
        return obs[0].numpy().astype(np.float32), float(reward[0]), bool(terminated[0]), truncated, {}


def _register() -> None:
    for name, family in (("Navigation2D", Navigation2D), ("Bandit", Bandit)):
        env_id = f"metalearn/{name}-v0"
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=lambda family=family, **kwargs: GymnasiumEnv(family(**kwargs)))


_register()
