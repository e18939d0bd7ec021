"""Environment task families: 2D navigation and bandit dynamics against hand-worked steps, the
gymnasium API, rollouts' masking, and reproducible task batches."""

from __future__ import annotations

import math

import gymnasium
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from metalearn.rl.envs import Bandit, Navigation2D
from metalearn.rl.rollout import draw_noise, rollout
from metalearn.rl.tasks import EnvTaskBatch, EnvTasks

# The environments observe positions, which are unbounded; gymnasium's checker says so.
pytestmark = pytest.mark.filterwarnings("ignore:.*Box observation space m:UserWarning")


def test_navigation_steps_by_hand() -> None:
    env = Navigation2D()
    obs = env.reset(torch.tensor([[0.3, -0.2], [0.055, 0.1]]), torch.zeros(2, dtype=torch.long))
    assert torch.equal(obs, torch.zeros(2, 2))  # both start at the origin
    # (0.05, 0.2) is clipped to (0.05, 0.1): position (0.05, 0.1) for both.
    obs, reward, terminated = env.step(torch.tensor([[0.05, 0.2], [0.05, 0.2]]), torch.zeros(2, 0))
    torch.testing.assert_close(obs, torch.tensor([[0.05, 0.1], [0.05, 0.1]]))
    # Task 0: the goal is (0.25, -0.3) away; task 1: 0.005 away, within 0.01 of the goal: done.
    torch.testing.assert_close(reward, torch.tensor([-math.hypot(0.25, 0.3), -0.005]))
    assert terminated.tolist() == [False, True]
    obs, reward, _ = env.step(torch.tensor([[-1.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 0))
    torch.testing.assert_close(obs[0], torch.tensor([-0.05, 0.1]))  # -1 clipped to -0.1
    torch.testing.assert_close(reward[0], torch.tensor(-math.hypot(0.35, 0.3)))


def test_normalized_actions_are_scaled_to_the_velocity_bound() -> None:
    env = Navigation2D(normalized_actions=True)
    env.reset(torch.tensor([[0.3, -0.2]]), torch.zeros(1, dtype=torch.long))
    # (0.5, -3.0) in [-1, 1] units: velocity (0.05, -0.1) (-3 clipped to -1, times max_action 0.1).
    obs, reward, _ = env.step(torch.tensor([[0.5, -3.0]]), torch.zeros(1, 0))
    torch.testing.assert_close(obs, torch.tensor([[0.05, -0.1]]))
    torch.testing.assert_close(reward, torch.tensor([-math.hypot(0.25, 0.1)]))
    space = gymnasium.make("metalearn/Navigation2D-v0", normalized_actions=True).action_space
    assert float(space.high[0]) == 1.0 and float(gymnasium.make("metalearn/Navigation2D-v0").action_space.high[0]) \
        == pytest.approx(0.1)


def test_oracle_observes_the_goal() -> None:
    env = Navigation2D(observe_goal=True)
    obs = env.reset(torch.tensor([[0.3, -0.2]]), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(obs, torch.tensor([[0.0, 0.0, 0.3, -0.2]]))


def test_bandit_pays_when_the_uniform_is_below_the_arms_probability() -> None:
    env = Bandit(arms=2)
    env.reset(torch.tensor([[0.2, 0.9], [0.2, 0.9], [0.2, 0.9]]), torch.zeros(3, dtype=torch.long))
    _, reward, terminated = env.step(torch.tensor([1, 0, 0]), torch.tensor([[0.5], [0.5], [0.1]]))
    assert reward.tolist() == [1.0, 0.0, 1.0] and terminated.all()  # every pull ends an episode
    with pytest.raises(ValueError, match="arms=0"):
        Bandit(arms=0)


def test_bandit_payout_rates_match_the_probabilities() -> None:
    env = Bandit(arms=3)
    n = 20_000
    params = torch.tensor([[0.1, 0.5, 0.8]]).expand(n, 3)
    env.reset(params, torch.zeros(n, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    for arm, p in enumerate((0.1, 0.5, 0.8)):
        _, reward, _ = env.step(torch.full((n,), arm), torch.rand(n, 1, generator=g))
        assert abs(reward.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("env_id", ["metalearn/Navigation2D-v0", "metalearn/Bandit-v0"])
def test_gymnasium_api(env_id: str) -> None:
    env = gymnasium.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=3)
    again, info_again = env.reset(seed=3)
    assert (obs == again).all() and (info["task"] == info_again["task"]).all()  # the task comes from the seed


def test_gymnasium_navigation_by_hand_and_time_limit() -> None:
    env = gymnasium.make("metalearn/Navigation2D-v0", horizon=3)
    obs, _ = env.reset(options={"task": [0.5, 0.5]})
    assert obs.tolist() == [0.0, 0.0]
    for t in range(3):
        obs, reward, terminated, truncated, _ = env.step([0.1, 0.1])
        position = 0.1 * (t + 1)
        assert obs == pytest.approx([position, position])
        assert reward == pytest.approx(-math.hypot(0.5 - position, 0.5 - position), rel=1e-6)
        assert not terminated and truncated == (t == 2)


def test_rollout_masks_steps_after_an_episode_ends() -> None:
    """A policy that moves 0.1 along x: the goal (0.2, 0) is reached at step 2; the goal (1, 0) never."""
    env = Navigation2D(horizon=5)
    noise = draw_noise(env, [torch.Generator().manual_seed(0)] * 2, episodes=1)
    trajectories = rollout(lambda obs, eps: torch.tensor([[0.1, 0.0]]).expand(len(obs), 2), env,
                           torch.tensor([[0.2, 0.0], [1.0, 0.0]]), noise)
    assert trajectories.mask[:, 0].tolist() == [1, 1, 0, 0, 0]
    assert trajectories.mask[:, 1].tolist() == [1, 1, 1, 1, 1]
    torch.testing.assert_close(trajectories.returns(), torch.tensor([-0.1, -(0.9 + 0.8 + 0.7 + 0.6 + 0.5)]))


def test_task_batches_are_reproducible_and_split_by_seed() -> None:
    tasks = EnvTasks(Navigation2D())
    a = tasks.sample(4, "train", torch.Generator().manual_seed(5))
    b = tasks.sample(4, "train", torch.Generator().manual_seed(5))
    assert torch.equal(a.params, b.params) and torch.equal(a.seeds, b.seeds)
    assert a.params.min() >= -0.5 and a.params.max() <= 0.5
    joined = EnvTaskBatch.cat([a[0], a[1:]])
    assert torch.equal(joined.params, a.params) and torch.equal(joined.seeds, a.seeds)
    # A task's noise depends on its own seed only, not on its batch.
    alone = draw_noise(tasks.env, a[2].generators(), episodes=3)
    together = draw_noise(tasks.env, a.generators(), episodes=3)
    assert torch.equal(alone.policy, together.policy[:, 6:9])


def test_declared_sizes_must_be_the_environments() -> None:
    with pytest.raises(ValueError, match=r"observation_size=2: the environment \(Navigation2D\) has 4"):
        EnvTasks(Navigation2D(observe_goal=True), observation_size=2)
    with pytest.raises(ValueError, match=r"action_size=5: the environment \(Bandit\) has 3"):
        EnvTasks(Bandit(arms=3), action_size=5)
