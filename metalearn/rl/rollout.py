"""Rollouts of many episodes at once, returns, the linear feature baseline and advantages.

Trajectories are time-major tensors over N = tasks × episodes rows, task-major (task i's episodes are
rows i·E … i·E + E − 1). `mask[t, n]` is 1 while step t belongs to episode n: an episode that
terminated (or reached the time limit) contributes nothing afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metalearn.rl.envs import BatchEnv

# policy(observations [N, O], noise [N, A] or [N]) -> actions
Actor = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Trajectories:
    """Episodes of a batch of tasks: time-major [T, N, ...], N = tasks × episodes (task-major)."""

    observations: Tensor  # [T, N, O]
    actions: Tensor  # [T, N, A] (continuous) or [T, N] (discrete)
    rewards: Tensor  # [T, N], 0 where masked
    mask: Tensor  # [T, N] float, 1 while the step belongs to the episode
    tasks: int

    @property
    def episodes(self) -> int:
        """Episodes per task."""
        return self.mask.shape[1] // self.tasks

    def task(self, i: int) -> Trajectories:
        """The episodes of task `i` alone."""
        rows = slice(i * self.episodes, (i + 1) * self.episodes)
        return Trajectories(self.observations[:, rows], self.actions[:, rows], self.rewards[:, rows],
                            self.mask[:, rows], 1)

    def returns(self) -> Tensor:
        """Undiscounted return of every episode, [N]."""
        return self.rewards.sum(0)

    def task_returns(self) -> Tensor:
        """Mean undiscounted episode return of each task, [tasks]."""
        return self.returns().view(self.tasks, self.episodes).mean(1)


@dataclass(frozen=True)
class RolloutNoise:
    """Everything random in a rollout, pre-drawn per task so that a task's episodes do not depend on
    the other tasks of its batch: policy noise (standard normals, or uniforms for discrete actions),
    the environment's uniforms and the episodes' reset seeds."""

    policy: Tensor  # [T, N, A] or [T, N]
    env: Tensor  # [T, N, noise_size]
    seeds: Tensor  # [N] int64


def draw_noise(env: BatchEnv, generators: Sequence[torch.Generator], episodes: int, horizon: int | None = None
               ) -> RolloutNoise:
    """Noise for `episodes` episodes of each task, task i's from `generators[i]` alone."""
    steps = horizon or env.horizon
    policy, env_noise, seeds = [], [], []
    for generator in generators:
        if env.discrete:
            policy.append(torch.rand(steps, episodes, generator=generator))
        else:
            policy.append(torch.randn(steps, episodes, env.action_size, generator=generator))
        env_noise.append(torch.rand(steps, episodes, env.noise_size, generator=generator))
        seeds.append(torch.randint(0, 2**62, (episodes,), generator=generator))
    return RolloutNoise(torch.cat(policy, 1), torch.cat(env_noise, 1), torch.cat(seeds))


@torch.no_grad()
def rollout(actor: Actor, env: BatchEnv, params: Tensor, noise: RolloutNoise) -> Trajectories:
    """Run one episode per noise row: rows i·E … of task i (`params[i]`), up to the horizon or the end."""
    tasks = len(params)
    n = noise.seeds.numel()
    observation = env.reset(params.repeat_interleave(n // tasks, 0), noise.seeds)
    alive = torch.ones(n, dtype=torch.bool)
    observations, actions, rewards, masks = [], [], [], []
    for t in range(noise.policy.shape[0]):
        action = actor(observation, noise.policy[t])
        next_observation, reward, terminated = env.step(action, noise.env[t])
        mask = alive.to(torch.float32)
        observations.append(observation)
        actions.append(action)
        rewards.append(reward * mask)
        masks.append(mask)
        alive = alive & ~terminated
        observation = next_observation
        if not alive.any():
            break
    return Trajectories(torch.stack(observations), torch.stack(actions), torch.stack(rewards), torch.stack(masks),
                        tasks)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """R_t = r_t + γ r_{t+1} + … within each episode, [T, N]."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running * mask[t]
        out[t] = running * mask[t]
    return out


def baseline_features(observations: Tensor, mask: Tensor) -> Tensor:
    """The linear feature baseline's features (Duan et al., 2016): the observation, its square, time
    t/100 and its square and cube, and a constant; zero where masked. [T, N, 2·O + 4]."""
    steps = observations.shape[0]
    t = (torch.arange(steps, dtype=observations.dtype) / 100.0).view(-1, 1, 1).expand(*observations.shape[:2], 1)
    obs = observations.clamp(-10, 10)
    features = torch.cat([obs, obs**2, t, t**2, t**3, torch.ones_like(t)], dim=2)
    return features * mask.unsqueeze(-1)


def fit_linear_baseline(features: Tensor, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Least-squares weights w of returns ≈ features · w, for a batch of tasks at once: `features`
    [B, M, F] and `returns` [B, M] over each task's M steps (zero rows for masked steps), ridge `reg`
    raised ten-fold while a solve is not finite, as rllab does. [B, F]."""
    x, y = features.double(), returns.double()
    gram, rhs = x.transpose(1, 2) @ x, (x.transpose(1, 2) @ y.unsqueeze(2))
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    weights = torch.zeros(gram.shape[:2], dtype=gram.dtype)
    todo = torch.ones(len(gram), dtype=torch.bool)
    for _ in range(5):
        solved = torch.linalg.lstsq(gram[todo] + reg * eye, rhs[todo]).solution.squeeze(2)
        finite = torch.isfinite(solved).all(1)
        index = todo.nonzero().squeeze(1)
        weights[index[finite]] = solved[finite]
        todo[index[finite]] = False
        if not todo.any():
            break
        reg *= 10
    return weights.to(returns.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimates (Schulman et al., 2016) within each episode, [T, N]; `values` [T, N]
    estimates the return from each step (0 after the episode)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    next_value = torch.zeros_like(rewards[0])
    for t in range(len(rewards) - 1, -1, -1):
        delta = rewards[t] + gamma * next_value * mask[t] - values[t]
        running = (delta + gamma * lam * running) * mask[t]
        advantages[t] = running
        next_value = values[t] * mask[t]
    return advantages


def linear_baseline_advantages(trajectories: Trajectories, gamma: float, lam: float, center: bool = True) -> Tensor:
    """Advantages of every step, with a linear feature baseline fitted to each task's own episodes (as in
    MAML's policy-gradient experiments) and, if `center`, normalised within each task. [T, N]."""
    steps, n = trajectories.mask.shape
    tasks, episodes = trajectories.tasks, trajectories.episodes
    mask = trajectories.mask
    returns = discounted_returns(trajectories.rewards, mask, gamma)
    features = baseline_features(trajectories.observations, mask)  # [T, N, F]
    by_task = features.view(steps, tasks, episodes, -1).transpose(0, 1).reshape(tasks, steps * episodes, -1)
    weights = fit_linear_baseline(by_task, returns.view(steps, tasks, episodes).transpose(0, 1).reshape(tasks, -1))
    values = torch.einsum("tbef,bf->tbe", features.view(steps, tasks, episodes, -1), weights).reshape(steps, n)
    advantages = gae(trajectories.rewards, values, mask, gamma, lam)
    if not center:
        return advantages
    a, m = advantages.view(steps, tasks, episodes), mask.view(steps, tasks, episodes)
    count = m.sum((0, 2), keepdim=True).clamp_min(1.0)
    mean = (a * m).sum((0, 2), keepdim=True) / count
    std = ((((a - mean) * m) ** 2).sum((0, 2), keepdim=True) / count).sqrt()
    return ((a - mean) / (std + 1e-8) * m).view(steps, n)


def normalize(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values − mean) / std over the valid steps; zero where masked."""
    count = mask.sum().clamp_min(1.0)
    mean = (values * mask).sum() / count
    std = ((((values - mean) * mask) ** 2).sum() / count).sqrt()
    return (values - mean) / (std + eps) * mask


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the valid steps."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """Log-density of `actions` under independent normals, summed over the action's last dimension."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - LOG_SQRT_2PI).sum(-1)


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL(p ‖ q) of diagonal normals, summed over the last dimension."""
    var_p, var_q = (2 * log_std_p).exp(), (2 * log_std_q).exp()
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)


def categorical_sample(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Actions drawn from softmax(`logits`) by inverting the CDF at pre-drawn `uniforms` [N]."""
    cdf = logits.softmax(-1).cumsum(-1)
    positions = uniforms.unsqueeze(-1).to(cdf.dtype).contiguous()
    return torch.searchsorted(cdf.contiguous(), positions).squeeze(-1).clamp_max(logits.shape[-1] - 1)
