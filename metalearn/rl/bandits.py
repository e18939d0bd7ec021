"""Hand-designed bandit algorithms, the references RL² is compared against (Duan et al., 2016, Table 1):
Thompson sampling with Beta(1, 1) priors and UCB1 (Auer et al., 2002). Each plays a batch of
Bernoulli bandits for a number of pulls, with its randomness from pre-drawn uniforms."""

from __future__ import annotations

import torch
from torch import Tensor


def expected_regret(params: Tensor, actions: Tensor) -> Tensor:
    """Cumulative expected regret after each pull: Σ_{s≤t} (max_i p_i − p_{a_s}). params [B, K],
    actions [B, n] -> [B, n]."""
    best = params.max(1, keepdim=True).values
    return (best - params.gather(1, actions.long())).cumsum(1)


def thompson_sampling(params: Tensor, pulls: int, generator: torch.Generator) -> Tensor:
    """Actions [B, pulls] of Thompson sampling: pull the arm whose draw from its Beta(1 + wins, 1 + losses)
    posterior is largest."""
    tasks, arms = params.shape
    wins, losses = torch.zeros(tasks, arms), torch.zeros(tasks, arms)
    actions = []
    # Beta draws take no generator: seed torch's global one from `generator`, and leave it as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        for _ in range(pulls):
            action = torch.distributions.Beta(1 + wins, 1 + losses).sample().argmax(1)
            payout = params.gather(1, action.view(-1, 1)).squeeze(1)
            reward = (torch.rand(tasks, generator=generator) < payout).float()
            wins.scatter_add_(1, action.view(-1, 1), reward.view(-1, 1))
            losses.scatter_add_(1, action.view(-1, 1), 1 - reward.view(-1, 1))
            actions.append(action)
    return torch.stack(actions, 1)


def ucb1(params: Tensor, pulls: int, generator: torch.Generator) -> Tensor:
    """Actions [B, pulls] of UCB1: each arm once, then the arm maximising mean + √(2 ln t / n_i)."""
    tasks, arms = params.shape
    total, count = torch.zeros(tasks, arms), torch.zeros(tasks, arms)
    actions = []
    for t in range(pulls):
        if t < arms:
            action = torch.full((tasks,), t, dtype=torch.long)
        else:
            bonus = torch.sqrt(2 * torch.log(torch.tensor(float(t))) / count)
            action = (total / count + bonus).argmax(1)
        reward = (torch.rand(tasks, generator=generator) < params.gather(1, action.view(-1, 1)).squeeze(1)).float()
        total.scatter_add_(1, action.view(-1, 1), reward.view(-1, 1))
        count.scatter_add_(1, action.view(-1, 1), torch.ones(tasks, 1))
        actions.append(action)
    return torch.stack(actions, 1)
