"""RL²: the recurrent policy's inputs and masked state, trials against hand counts, the training
recomputation matching the rollout, bandit baselines, and a short run that learns above chance."""

from __future__ import annotations

import pytest
import torch

from metalearn.algorithms.rl2 import RL2
from metalearn.models.mlp import MLP
from metalearn.models.recurrent import RecurrentPolicy
from metalearn.rl.bandits import expected_regret, thompson_sampling, ucb1
from metalearn.rl.envs import Bandit, Navigation2D
from metalearn.rl.rollout import categorical_sample, draw_noise
from metalearn.rl.tasks import EnvTaskBatch, EnvTasks


def make(env: Bandit | Navigation2D, hidden: int = 16, seed: int = 0, **kwargs: object) -> tuple[EnvTasks, RL2]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RecurrentPolicy(env.observation_size, env.action_size, env.discrete, hidden=hidden)
    tasks = EnvTasks(env)
    algorithm = RL2(model, tasks.objective, **kwargs)  # type: ignore[arg-type]
    algorithm.setup(tasks)
    return tasks, algorithm


def test_inputs_by_hand_and_state_kept_for_finished_episodes() -> None:
    policy = RecurrentPolicy(1, 3, discrete=True, hidden=4)
    x = policy.encode(torch.tensor([[0.5]]), torch.tensor([2]), torch.tensor([1.0]), torch.tensor([True]))
    assert x.tolist() == [[0.5, 0.0, 0.0, 1.0, 1.0, 1.0]]
    state = torch.randn(2, 4)
    _, _, new = policy.step(torch.cat([x, x]), state, alive=torch.tensor([True, False]))
    assert not torch.equal(new[0], state[0]) and torch.equal(new[1], state[1])
    continuous = RecurrentPolicy(2, 2, discrete=False, hidden=4)
    encoded = continuous.encode(torch.zeros(1, 2), torch.tensor([[0.1, -0.2]]), torch.tensor([-3.0]),
                                torch.tensor([False]))
    torch.testing.assert_close(encoded, torch.tensor([[0.0, 0.0, 0.1, -0.2, -3.0, 0.0]]))
    none_yet = policy.encode(torch.tensor([[0.5]]), torch.tensor([3]), torch.tensor([0.0]), torch.tensor([False]))
    assert none_yet.tolist() == [[0.5, 0.0, 0.0, 0.0, 0.0, 0.0]]


def test_bandit_trial_counts_and_training_recomputes_the_rollout() -> None:
    tasks, algorithm = make(Bandit(arms=3), episodes_per_trial=7, trials_per_task=2)
    batch = tasks.sample(4, "train", torch.Generator().manual_seed(0))
    data = algorithm.run_trials(batch, purpose=0)
    assert data.inputs.shape == (7, 8, 1 + 3 + 2) and data.alive.all()  # one pull per episode, 4 tasks × 2 trials
    assert data.episode.tolist() == list(range(7))
    torch.testing.assert_close(data.episode_returns(7), data.rewards.T)
    # The previous action and reward of each step are the inputs of the next one.
    assert torch.equal(data.inputs[1:, :, 1:4].argmax(-1), data.actions[:-1])
    assert torch.equal(data.inputs[1:, :, 4], data.rewards[:-1])
    assert torch.equal(data.inputs[0, :, 1:], torch.zeros(8, 5))  # the trial starts blank
    # Re-running the GRU over the stored inputs (as training does) gives the policy that acted.
    out, _ = algorithm.policy.unroll(data.inputs, data.alive)
    noise = draw_noise(tasks.env, batch.generators(0), episodes=7 * 2)
    uniforms = noise.policy.view(1, 4, 7, 2).permute(2, 0, 1, 3).reshape(7, 8)
    assert torch.equal(categorical_sample(out, uniforms), data.actions)


def test_navigation_trial_masks_early_ends() -> None:
    """With a success radius of 0.45 an episode can end early; the state waits, the next episode starts
    from the origin, and each episode's return sums its own steps."""
    env = Navigation2D(horizon=6, success_radius=0.45)
    tasks, algorithm = make(env, episodes_per_trial=3)
    batch = EnvTaskBatch(torch.tensor([[0.05, 0.0], [0.5, 0.5]]), torch.tensor([1, 2]))
    data = algorithm.run_trials(batch, purpose=0)
    assert not data.alive[:, 0].all()  # the near goal: the first step already ends the episode
    first = data.episode == 0
    assert data.alive[first, 0].tolist()[0] and not data.alive[first, 0][1:].any()
    returns = data.episode_returns(3)
    for k in range(3):
        torch.testing.assert_close(returns[:, k], (data.rewards * (data.episode == k).unsqueeze(1)).sum(0))
    starts = torch.nonzero(torch.diff(data.episode, prepend=torch.tensor([-1]))).squeeze(1)
    assert torch.equal(data.inputs[starts, :, :2], torch.zeros(3, 2, 2))  # every episode starts at the origin


def test_bandit_baselines() -> None:
    params = torch.tensor([[0.1, 0.9, 0.5]])
    torch.testing.assert_close(expected_regret(params, torch.tensor([[0, 1, 2, 1]])),
                               torch.tensor([[0.8, 0.8, 1.2, 1.2]]))
    generator = torch.Generator().manual_seed(0)
    actions = ucb1(params, 300, generator)
    assert actions[0, :3].tolist() == [0, 1, 2]  # every arm once first
    assert (actions[0, 150:] == 1).float().mean() > 0.9
    thompson = thompson_sampling(params, 300, torch.Generator().manual_seed(1))
    assert (thompson[0, 150:] == 1).float().mean() > 0.9
    before = torch.get_rng_state()
    thompson_sampling(params, 5, torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), before)  # its own randomness only
    again = thompson_sampling(params, 300, torch.Generator().manual_seed(1))
    assert torch.equal(again, thompson)


def good_arm_bandits(n: int, generator: torch.Generator) -> EnvTaskBatch:
    """Two arms, one paying with probability 0.9 and the other 0.1, which one drawn at random."""
    good = torch.randint(0, 2, (n,), generator=generator)
    params = torch.full((n, 2), 0.1)
    params[torch.arange(n), good] = 0.9
    return EnvTaskBatch(params, torch.randint(0, 2**62, (n,), generator=generator))


def test_short_run_learns_which_arm_pays() -> None:
    """Ten pulls of a bandit whose good arm is unknown: a fixed policy earns 0.5 per pull, one that
    stays after a win and switches after a loss about 0.8. After 300 A2C steps RL² earns well above
    0.5 on 200 held-out bandits: it adapts within the trial, in its hidden state."""
    tasks, algorithm = make(Bandit(arms=2), hidden=32, episodes_per_trial=10, gae_lambda=0.3, score="mean")
    test = good_arm_bandits(200, torch.Generator().manual_seed(5))
    untrained = algorithm.evaluate(test).score.mean().item()
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        optimizer.zero_grad()
        algorithm.meta_train_step(good_arm_bandits(64, generator))
        optimizer.step()
    scores = algorithm.evaluate(test)
    assert abs(untrained - 0.5) < 0.06
    assert scores.score.mean().item() > 0.7
    # Later pulls pay more than the first: it learned from the first ones.
    assert scores.score.mean() > scores.score_pre.mean() + 0.15


def test_refuses_a_policy_without_memory_and_a_misfit() -> None:
    tasks = EnvTasks(Bandit(arms=3))
    with pytest.raises(ValueError, match="needs a recurrent policy .*model=gru_policy"):
        RL2(MLP(1, 3, hidden_sizes=[4]), tasks.objective)
    algorithm = RL2(RecurrentPolicy(1, 4, discrete=True, hidden=4), tasks.objective)
    with pytest.raises(ValueError, match=r"action_size=4, .* does not fit the environment \(1, 3, True\)"):
        algorithm.setup(tasks)
    with pytest.raises(ValueError, match="score='best'"):
        RL2(RecurrentPolicy(1, 3, discrete=True, hidden=4), tasks.objective, score="best")
