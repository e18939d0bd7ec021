"""The HalfCheetah task families (metalearn.rl.mujoco): task sampling, seeded resets, the rewards
against gymnasium's own HalfCheetah-v5, batching, the gymnasium registration, and the error without
MuJoCo."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from metalearn.rl.envs import BatchEnv
from metalearn.rl.mujoco import HalfCheetahDir, HalfCheetahVel

# Compiling gymnasium's HalfCheetah model warns that MuJoCo 4 deprecates an attribute it uses.
pytestmark = pytest.mark.filterwarnings("ignore:MuJoCo. compiler attribute:RuntimeWarning")
needs_mujoco = pytest.mark.skipif(importlib.util.find_spec("mujoco") is None,
                                  reason='MuJoCo is not installed: pip install "gymnasium[mujoco]"')


def raw_half_cheetah() -> gymnasium.Env:  # type: ignore[type-arg]
    """gymnasium's own HalfCheetah-v5, made without MuJoCo's warning log file in the working directory."""
    import mujoco

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda message: None)
    try:
        return gymnasium.make("HalfCheetah-v5")
    finally:
        mujoco.set_mju_user_warning(previous)


def actions(steps: int, n: int, seed: int = 0) -> torch.Tensor:
    """Random actions in [-1, 1], [steps, n, 6]."""
    return torch.rand(steps, n, 6, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@needs_mujoco
def test_protocol_and_sizes() -> None:
    for family in (HalfCheetahVel(), HalfCheetahDir()):
        assert isinstance(family, BatchEnv)
        assert (family.observation_size, family.action_size, family.param_size, family.noise_size) == (17, 6, 1, 0)
        assert not family.discrete and family.max_action == 1.0 and family.horizon == 200


@needs_mujoco
def test_sample_params_reproducible_and_in_range() -> None:
    vel = HalfCheetahVel(velocity_low=0.5, velocity_high=1.5)
    a = vel.sample_params(500, torch.Generator().manual_seed(3))
    b = vel.sample_params(500, torch.Generator().manual_seed(3))
    assert a.shape == (500, 1) and torch.equal(a, b)
    assert 0.5 <= a.min() and a.max() <= 1.5 and a.std() > 0.2
    direction = HalfCheetahDir().sample_params(500, torch.Generator().manual_seed(3))
    assert direction.shape == (500, 1)
    assert torch.equal(direction, HalfCheetahDir().sample_params(500, torch.Generator().manual_seed(3)))
    assert set(direction.flatten().tolist()) == {-1.0, 1.0}
    assert 0.4 < (direction == 1).float().mean() < 0.6


@needs_mujoco
def test_reset_is_seeded() -> None:
    family = HalfCheetahVel()
    params = torch.ones(3, 1)
    first = family.reset(params, torch.tensor([1, 2, 3]))
    assert first.shape == (3, 17) and first.dtype == torch.float32
    family.step(actions(1, 3)[0], torch.zeros(3, 0))
    assert torch.equal(family.reset(params, torch.tensor([1, 2, 3])), first)
    other = family.reset(params, torch.tensor([4, 5, 6]))
    assert not torch.isclose(other, first).all(dim=1).any()
    assert not torch.isclose(first[0], first[1]).all()


@needs_mujoco
@pytest.mark.parametrize("make, task", [(lambda: HalfCheetahVel(ctrl_cost=0.05), 1.3), (HalfCheetahDir, -1.0),
                                        (lambda: HalfCheetahDir(ctrl_cost=0.2), 1.0)])
def test_reward_matches_formula_against_gymnasium(make: Callable[[], HalfCheetahVel | HalfCheetahDir],
                                                  task: float) -> None:
    family = make()
    raw = raw_half_cheetah()
    raw_obs, _ = raw.reset(seed=11)
    obs = family.reset(torch.tensor([[task]]), torch.tensor([11]))
    np.testing.assert_allclose(obs[0].numpy(), raw_obs, rtol=1e-6, atol=1e-6)
    for action in actions(5, 1, seed=1):
        raw_obs, _, _, _, info = raw.step(action[0].numpy())
        obs, reward, terminated = family.step(action, torch.zeros(1, 0))
        velocity, cost = info["x_velocity"], family.ctrl_cost * float((action[0].double() ** 2).sum())
        expected = -abs(velocity - task) - cost if isinstance(family, HalfCheetahVel) else task * velocity - cost
        assert reward.shape == (1,) and reward.dtype == torch.float32
        assert reward.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(obs[0].numpy(), raw_obs, rtol=1e-5, atol=1e-5)
        assert terminated.tolist() == [False]
    raw.close()


@needs_mujoco
def test_model_warnings_go_to_python_not_a_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HalfCheetahDir().reset(torch.ones(2, 1), torch.tensor([0, 1]))
    assert list(tmp_path.iterdir()) == []
    assert all(issubclass(w.category, RuntimeWarning) and str(w.message).startswith("MuJoCo: ") for w in caught)


@needs_mujoco
def test_step_checks_the_batch_size() -> None:
    family = HalfCheetahVel()
    family.reset(torch.ones(2, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="action has 3 rows: must match the 2 episodes"):
        family.step(actions(1, 3)[0], torch.zeros(3, 0))


@needs_mujoco
def test_actions_are_clipped() -> None:
    family = HalfCheetahDir()
    params, seeds = torch.ones(2, 1), torch.tensor([0, 0])
    family.reset(params, seeds)
    action = torch.tensor([[3.0, -2.0, 0.5, 1.0, -1.5, 0.0], [1.0, -1.0, 0.5, 1.0, -1.0, 0.0]])
    obs, reward, _ = family.step(action, torch.zeros(2, 0))
    assert torch.equal(obs[0], obs[1]) and torch.equal(reward[0], reward[1])


@needs_mujoco
def test_batch_equals_separate_runs() -> None:
    targets, seeds = torch.tensor([[0.2], [1.0], [1.9]]), torch.tensor([7, 8, 9])
    acts = actions(6, 3, seed=2)
    batch = HalfCheetahVel()
    batch_obs = [batch.reset(targets, seeds)]
    batch_rewards = []
    for action in acts:
        obs, reward, _ = batch.step(action, torch.zeros(3, 0))
        batch_obs.append(obs)
        batch_rewards.append(reward)
    single = HalfCheetahVel()
    for i in range(3):
        obs_i = [single.reset(targets[i:i + 1], seeds[i:i + 1])]
        rewards_i = []
        for action in acts:
            obs, reward, _ = single.step(action[i:i + 1], torch.zeros(1, 0))
            obs_i.append(obs)
            rewards_i.append(reward)
        assert torch.equal(torch.stack(rewards_i)[:, 0], torch.stack(batch_rewards)[:, i])
        assert torch.equal(torch.stack(obs_i)[:, 0], torch.stack(batch_obs)[:, i])
    # Different targets, same dynamics otherwise: rewards differ between rows.
    assert len(set(torch.stack(batch_rewards)[-1].tolist())) == 3


@needs_mujoco
def test_pool_grows_and_is_reused() -> None:
    family = HalfCheetahVel()
    family.reset(torch.ones(2, 1), torch.tensor([0, 1]))
    pool = list(family._pool)
    family.reset(torch.ones(4, 1), torch.tensor([0, 1, 2, 3]))
    assert len(family._pool) == 4 and family._pool[:2] == pool
    obs, reward, terminated = family.step(actions(1, 4)[0], torch.zeros(4, 0))
    assert obs.shape == (4, 17) and reward.shape == (4,) and terminated.shape == (4,)
    family.reset(torch.ones(1, 1), torch.tensor([0]))
    assert len(family._pool) == 4 and family.step(actions(1, 1)[0], torch.zeros(1, 0))[1].shape == (1,)


@needs_mujoco
@pytest.mark.parametrize("env_id", ["metalearn/HalfCheetahVel-v0", "metalearn/HalfCheetahDir-v0"])
def test_gymnasium_registration_passes_env_checker(env_id: str) -> None:
    env = gymnasium.make(env_id, horizon=5)
    with warnings.catch_warnings():
        # The observation space is unbounded (as gymnasium's own HalfCheetah's), which it warns about.
        warnings.filterwarnings("ignore", message=".*Box observation space m.* value is .*infinity")
        check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0, options={"task": [0.7]})
    assert obs.shape == (17,) and obs.dtype == np.float32 and info["task"].tolist() == pytest.approx([0.7])
    ends = [env.step(env.action_space.sample())[2:4] for _ in range(5)]
    assert ends == [(False, False)] * 4 + [(False, True)]
    env.close()


def test_without_mujoco_a_one_line_error_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mujoco", None)  # `import mujoco` raises ImportError
    for name in [name for name in sys.modules if name.startswith("gymnasium.envs.mujoco")]:
        monkeypatch.delitem(sys.modules, name)
    for make in (HalfCheetahVel, HalfCheetahDir, lambda: gymnasium.make("metalearn/HalfCheetahVel-v0")):
        with pytest.raises(ImportError) as error:
            make()
        message = str(error.value)
        assert message.startswith('HalfCheetah tasks need MuJoCo: pip install "gymnasium[mujoco]" (')
        assert "\n" not in message
