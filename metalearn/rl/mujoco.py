"""MuJoCo locomotion task families for meta-reinforcement learning: the HalfCheetah tasks of MAML.

Finn et al. (2017), section 5.3: a planar cheetah (gymnasium's `HalfCheetah-v5`: 17 observations,
the joint positions without the torso's x and the joint velocities; 6 torques in [-1, 1]) must run
at a target velocity (`HalfCheetahVel`) or in a direction, forward or backward (`HalfCheetahDir`).
The rewards are those of the paper's rllab code, computed here from the torso's forward velocity
that the simulator reports, not gymnasium's own reward.

Each episode of a batch runs in its own gymnasium environment, one per row; the pool is created on
the first reset and grown when a larger batch arrives. The simulation is deterministic: the only
randomness is the initial state, drawn from the reset's seed (`seeds`), so `noise_size` is 0.

MuJoCo is optional: it is imported when a family is constructed, which raises an ImportError that
names the pip command if it is missing. The gymnasium ids `metalearn/HalfCheetahVel-v0` and
`metalearn/HalfCheetahDir-v0` are registered on import of this module without MuJoCo
(`gymnasium.make("metalearn.rl.mujoco:metalearn/HalfCheetahVel-v0")` imports it first).
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium
import numpy as np
import torch
from torch import Tensor

from metalearn.checks import non_negative_float, positive_int
from metalearn.rl.envs import GymnasiumEnv


def _half_cheetah_class() -> tuple[Any, Any]:
    """gymnasium's HalfCheetah-v5 environment class and the mujoco module, imported now."""
    try:
        import mujoco
        from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
    except (ImportError, gymnasium.error.DependencyNotInstalled) as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ImportError(f'HalfCheetah tasks need MuJoCo: pip install "gymnasium[mujoco]" ({detail})') from err
    return HalfCheetahEnv, mujoco


class _HalfCheetah:
    """A batch of HalfCheetah-v5 episodes, one gymnasium environment per row. Subclasses set the
    task distribution (`sample_params`) and the reward of a forward velocity (`_task_reward`)."""

    discrete = False
    observation_size = 17
    action_size = 6
    max_action = 1.0
    noise_size = 0
    param_size = 1

    def __init__(self, horizon: int, ctrl_cost: float) -> None:
        self.horizon = positive_int("horizon", horizon)
        self.ctrl_cost = non_negative_float("ctrl_cost", ctrl_cost)
        self._env_class, self._mujoco = _half_cheetah_class()
        self._pool: list[Any] = []
        self._task = np.zeros(0)  # [N] float64: each row's parameter

    def sample_params(self, n: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def _task_reward(self, velocity: np.ndarray) -> np.ndarray:
        """The reward before the control cost of each row's forward velocity [N]."""
        raise NotImplementedError

    def _make_env(self) -> Any:
        # MuJoCo prints the warnings of compiling gymnasium's model (a deprecated attribute in MuJoCo 4)
        # and appends them to MUJOCO_LOG.TXT in the working directory: send them to Python's warnings
        # instead, after the compilation (an exception raised inside MuJoCo's callback aborts Python).
        messages: list[str] = []
        previous = self._mujoco.get_mju_user_warning()
        self._mujoco.set_mju_user_warning(messages.append)
        try:
            env = self._env_class()
        finally:
            self._mujoco.set_mju_user_warning(previous)
        for message in messages:
            warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=3)
        return env

    def reset(self, params: Tensor, seeds: Tensor) -> Tensor:
        n = len(params)
        if len(seeds) != n:
            raise ValueError(f"seeds has {len(seeds)} rows: must match params' {n}")
        while len(self._pool) < n:  # creating an environment compiles the model: slow, so they are kept
            self._pool.append(self._make_env())
        self._task = params.detach().cpu().to(torch.float64).reshape(n, self.param_size)[:, 0].numpy()
        obs = np.empty((n, self.observation_size))
        for i, seed in enumerate(seeds.tolist()):
            obs[i] = self._pool[i].reset(seed=int(seed))[0]
        return torch.from_numpy(obs).to(torch.float32)

    def step(self, action: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = len(self._task)
        if len(action) != n:
            raise ValueError(f"action has {len(action)} rows: must match the {n} episodes of the last reset")
        act = action.detach().cpu().to(torch.float64).reshape(n, self.action_size).numpy()
        act = np.clip(act, -self.max_action, self.max_action)
        obs = np.empty((n, self.observation_size))
        velocity = np.empty(n)
        for i in range(n):
            obs[i], _, _, _, info = self._pool[i].step(act[i])
            velocity[i] = info["x_velocity"]
        reward = self._task_reward(velocity) - self.ctrl_cost * np.square(act).sum(1)
        return (torch.from_numpy(obs).to(torch.float32), torch.from_numpy(reward).to(torch.float32),
                torch.zeros(n, dtype=torch.bool))

    def close(self) -> None:
        """Close the pool's environments (they are created again on the next reset)."""
        for env in self._pool:
            env.close()
        self._pool = []


class HalfCheetahVel(_HalfCheetah):
    """HalfCheetah goal velocity (Finn et al., 2017, section 5.3): the cheetah must run forward at a
    target velocity drawn uniformly from [velocity_low, velocity_high] (the task's one parameter).
    The reward of a step is -|v - target| - ctrl_cost * sum(action²), v being the torso's forward
    velocity; actions are clipped to [-1, 1]. An episode never terminates: it lasts `horizon` steps.

    Args:
        horizon: the steps of an episode.
        velocity_low, velocity_high: the range of the target velocity.
        ctrl_cost: the weight of the control cost sum(action²) in the reward.
    """

    def __init__(self, horizon: int = 200, velocity_low: float = 0.0, velocity_high: float = 2.0,
                 ctrl_cost: float = 0.05) -> None:
        if not velocity_low <= velocity_high:
            raise ValueError(f"velocity_low={velocity_low}: must be at most velocity_high={velocity_high}")
        self.velocity_low, self.velocity_high = float(velocity_low), float(velocity_high)
        super().__init__(horizon, ctrl_cost)

    def sample_params(self, n: int, generator: torch.Generator) -> Tensor:
        return self.velocity_low + (self.velocity_high - self.velocity_low) * torch.rand(n, 1, generator=generator)

    def _task_reward(self, velocity: np.ndarray) -> np.ndarray:
        return -np.abs(velocity - self._task)


class HalfCheetahDir(_HalfCheetah):
    """HalfCheetah goal direction (Finn et al., 2017, section 5.3): the cheetah must run forward
    (direction +1) or backward (-1), each with probability 1/2 (the task's one parameter). The reward
    of a step is direction * v - ctrl_cost * sum(action²), v being the torso's forward velocity;
    actions are clipped to [-1, 1]. An episode never terminates: it lasts `horizon` steps.

    Args:
        horizon: the steps of an episode.
        ctrl_cost: the weight of the control cost sum(action²) in the reward.
    """

    def __init__(self, horizon: int = 200, ctrl_cost: float = 0.05) -> None:
        super().__init__(horizon, ctrl_cost)

    def sample_params(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, 2, (n, 1), generator=generator).to(torch.float32) * 2 - 1

    def _task_reward(self, velocity: np.ndarray) -> np.ndarray:
        return self._task * velocity


def _register() -> None:
    families: tuple[tuple[str, type[_HalfCheetah]], ...] = (
        ("HalfCheetahVel", HalfCheetahVel), ("HalfCheetahDir", HalfCheetahDir))
    for name, family in families:
        env_id = f"metalearn/{name}-v0"
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=lambda family=family, **kwargs: GymnasiumEnv(family(**kwargs)))


_register()
