"""Returns, advantages and the linear feature baseline against hand computations and least squares;
TRPO's conjugate gradient and update on known quadratics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalearn.rl.rollout import (
    Trajectories,
    baseline_features,
    discounted_returns,
    fit_linear_baseline,
    gae,
    gaussian_kl,
    gaussian_log_prob,
    linear_baseline_advantages,
)
from metalearn.rl.trpo import conjugate_gradient, trpo_update


def test_discounted_returns_by_hand() -> None:
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # episode 1 ended after two steps
    returns = discounted_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(returns, torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 1 + 0.5 * 2], [2 + 1.5, 2.0],
                                                      [3.0, 0.0]]))


def test_gae_limits() -> None:
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    mask = torch.ones(6, 3)
    mask[4:, 1] = 0
    rewards, values = rewards * mask, values * mask
    # λ = 1: discounted return minus the value; λ = 0: the one-step TD error.
    torch.testing.assert_close(gae(rewards, values, mask, 0.9, 1.0), (discounted_returns(rewards, mask, 0.9) - values)
                               * mask)
    next_values = torch.cat([values[1:], torch.zeros(1, 3)])
    torch.testing.assert_close(gae(rewards, values, mask, 0.9, 0.0), (rewards + 0.9 * next_values - values) * mask)


def test_linear_baseline_is_ridge_least_squares() -> None:
    g = torch.Generator().manual_seed(1)
    observations = torch.randn(7, 4, 2, generator=g)  # T=7, two tasks × two episodes
    mask = torch.ones(7, 4)
    mask[5:, 3] = 0
    returns = torch.randn(7, 4, generator=g) * mask
    features = baseline_features(observations, mask)
    assert features.shape == (7, 4, 2 * 2 + 4)
    t = 3 / 100
    torch.testing.assert_close(features[3, 0], torch.cat([observations[3, 0], observations[3, 0] ** 2,
                                                          torch.tensor([t, t**2, t**3, 1.0])]))
    by_task = features.view(7, 2, 2, -1).transpose(0, 1).reshape(2, 14, -1)
    weights = fit_linear_baseline(by_task, returns.view(7, 2, 2).transpose(0, 1).reshape(2, 14), reg=1e-5)
    for task in range(2):
        x = by_task[task].double().numpy()
        y = returns.view(7, 2, 2)[:, task].reshape(-1).double().numpy()
        expected = np.linalg.solve(x.T @ x + 1e-5 * np.eye(x.shape[1]), x.T @ y)
        np.testing.assert_allclose(weights[task].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_advantages_are_normalised_within_each_task() -> None:
    g = torch.Generator().manual_seed(2)
    trajectories = Trajectories(torch.randn(5, 6, 2, generator=g), torch.randn(5, 6, 2, generator=g),
                                torch.randn(5, 6, generator=g) * torch.arange(1, 7), torch.ones(5, 6), tasks=3)
    advantages = linear_baseline_advantages(trajectories, gamma=0.99, lam=1.0).view(5, 3, 2)
    torch.testing.assert_close(advantages.mean((0, 2)), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(advantages.std((0, 2), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_gaussian_log_prob_and_kl_against_torch_distributions() -> None:
    g = torch.Generator().manual_seed(3)
    mean_p, mean_q, x = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    log_std_p, log_std_q = torch.tensor([0.1, -0.3]), torch.tensor([-0.2, 0.4])
    p = torch.distributions.Normal(mean_p, log_std_p.exp())
    q = torch.distributions.Normal(mean_q, log_std_q.exp())
    torch.testing.assert_close(gaussian_log_prob(mean_p, log_std_p, x), p.log_prob(x).sum(-1))
    torch.testing.assert_close(gaussian_kl(mean_p, log_std_p, mean_q, log_std_q),
                               torch.distributions.kl_divergence(p, q).sum(-1))


def spd(n: int, seed: int) -> torch.Tensor:
    m = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


def test_conjugate_gradient_solves_a_known_quadratic() -> None:
    a = spd(6, 0)
    b = torch.arange(1.0, 7.0, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=6)  # exact in n steps (in exact arithmetic)
    torch.testing.assert_close(x, torch.linalg.solve(a, b))
    # Fewer iterations: still a descent on the quadratic ½xᵀAx − bᵀx.
    x2 = conjugate_gradient(lambda v: a @ v, b, iterations=2)
    assert 0.5 * x2 @ a @ x2 - b @ x2 < 0


def test_trpo_step_is_the_natural_gradient_on_the_kl_boundary() -> None:
    """Linear surrogate −wᵀθ, quadratic KL ½(θ−θ₀)ᵀA(θ−θ₀): the step is √(2δ / wᵀA⁻¹w)·A⁻¹w."""
    a, w = spd(4, 1), torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    theta0 = torch.tensor([0.3, 0.1, -0.2, 0.0], dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    max_kl = 0.01
    step = trpo_update([theta], lambda: -(w @ theta), lambda: 0.5 * (theta - theta0) @ a @ (theta - theta0),
                       max_kl=max_kl, damping=0.0, cg_iterations=4)
    natural = torch.linalg.solve(a, w)
    expected = theta0 + torch.sqrt(2 * max_kl / (w @ natural)) * natural
    torch.testing.assert_close(theta.detach(), expected)
    assert step.backtracks == 0 and step.kl == pytest.approx(max_kl) and step.loss_after < step.loss_before


def test_trpo_backtracks_until_the_constraint_holds_and_keeps_the_old_values_if_nothing_helps() -> None:
    a, theta0 = spd(3, 2), torch.zeros(3, dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    w = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)

    def kl() -> torch.Tensor:  # the quadratic model underestimates the true divergence 4x away from θ₀
        d = theta - theta0
        return 0.5 * d @ a @ d + 3 * (0.5 * d @ a @ d) ** 2 / 0.01
    step = trpo_update([theta], lambda: -(w @ theta), kl, max_kl=0.01, damping=0.0, cg_iterations=3)
    assert step.backtracks > 0 and step.kl <= 0.01 and step.loss_after < step.loss_before
    # A surrogate that every step makes worse: nothing is accepted and θ is unchanged.
    theta2 = theta0.clone().requires_grad_(True)
    result = trpo_update([theta2], lambda: -(w @ theta2) + 100 * (theta2 @ theta2) ** 2 * 1e6,
                         lambda: 0.5 * theta2 @ a @ theta2, max_kl=0.01, damping=0.0)
    assert result.step_norm == 0.0 and torch.equal(theta2.detach(), theta0)
