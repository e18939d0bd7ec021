"""MAML-RL: the meta-gradient through the inner policy-gradient step against finite differences,
evaluation independent of batching, refusing supervised data, and a short run on 2D navigation where
adaptation pays."""

from __future__ import annotations

import pytest
import torch

from metalearn.algorithms.maml_rl import MAMLRL, TaskData
from metalearn.models.mlp import MLP
from metalearn.rl.envs import Bandit, Navigation2D
from metalearn.rl.outer import PPO, TRPO, VPG, Surrogate
from metalearn.rl.tasks import EnvTaskBatch, EnvTasks
from metalearn.tasks import fixed_batches


def make(first_order: bool = False, env: Navigation2D | Bandit | None = None, hidden: int = 5, seed: int = 0,
         **kwargs: object) -> tuple[EnvTasks, MAMLRL]:
    env = env or Navigation2D(horizon=10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP(env.observation_size, env.action_size, hidden_sizes=[hidden], activation="tanh")
    tasks = EnvTasks(env)
    algorithm = MAMLRL(model, tasks.objective, first_order=first_order, **kwargs)  # type: ignore[arg-type]
    algorithm.setup(tasks)
    return tasks, algorithm


def double(data: TaskData) -> TaskData:
    return TaskData(*(x.double() if x.is_floating_point() else x for x in data))


@pytest.mark.parametrize("env", [Navigation2D(horizon=10), Bandit(arms=3)], ids=["navigation", "bandit"])
def test_meta_gradient_through_the_inner_step_matches_finite_differences(env: Navigation2D | Bandit) -> None:
    """On fixed trajectories, the gradient of the post-adaptation surrogate with respect to the
    meta-parameters (through θ' = θ − α∇L_inner(θ)) equals central finite differences; dropping the
    second-order terms (first_order=True) gives a different gradient."""
    tasks, algorithm = make(env=env, inner_lr=0.5, episodes=3)
    batch = tasks.sample(2, "train", torch.Generator().manual_seed(1))
    _, _, data, _ = algorithm._adapt_all(batch, 1, purpose=0)
    adapted, shared = algorithm.readapt(data)
    trajectories = algorithm.sample(batch, adapted, shared, purpose=1)
    post = double(algorithm.task_data(trajectories, algorithm._advantages(trajectories)))
    algorithm.double()
    data = [double(d) for d in data]
    params = list(algorithm.policy_params().values())
    with torch.no_grad():
        old, old_shared = algorithm.readapt(data)
        old_log_prob = algorithm._log_prob_by_task(old, old_shared, post.observations, post.actions)

    def surrogate() -> torch.Tensor:
        new, new_shared = algorithm.readapt(data)
        ratio = (algorithm._log_prob_by_task(new, new_shared, post.observations, post.actions) - old_log_prob).exp()
        return ((ratio * post.advantages * post.mask).sum((1, 2)) / post.mask.sum((1, 2))).mean()

    analytic = torch.cat([g.reshape(-1) for g in torch.autograd.grad(surrogate(), params)])
    numeric = []
    eps = 1e-6
    with torch.no_grad():
        for p in params:
            for i in range(p.numel()):
                value = p.view(-1)[i].item()
                p.view(-1)[i] = value + eps
                with torch.enable_grad():
                    up = surrogate().item()
                p.view(-1)[i] = value - eps
                with torch.enable_grad():
                    down = surrogate().item()
                p.view(-1)[i] = value
                numeric.append((up - down) / (2 * eps))
    torch.testing.assert_close(analytic, torch.tensor(numeric, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    algorithm.first_order = True
    first = torch.cat([g.reshape(-1) for g in torch.autograd.grad(surrogate(), params)])
    assert (first - analytic).abs().max() > 1e-3 * analytic.abs().max()


def test_trpo_meta_step_keeps_the_kl_and_improves_the_surrogate() -> None:
    tasks, algorithm = make(inner_lr=0.1, episodes=4, outer=TRPO(max_kl=0.01))
    before = {k: v.detach().clone() for k, v in algorithm.policy_params().items()}
    optimizer = torch.optim.Adam(algorithm.parameters())  # not used by TRPO's own step
    result, norm = algorithm.update(tasks.sample(3, "train", torch.Generator().manual_seed(2)), optimizer)
    moved = sum((v.detach() - before[k]).pow(2).sum() for k, v in algorithm.policy_params().items()) ** 0.5
    assert norm == pytest.approx(float(moved), rel=1e-4) and norm > 0
    assert all(not state for state in optimizer.state.values())
    assert all(p.grad is None for p in algorithm.parameters())  # it stepped itself
    assert result.score == -result.meta_loss


@pytest.mark.parametrize("outer", [PPO(clip=0.2, epochs=3), VPG()], ids=["ppo", "vpg"])
def test_optimizer_outer_steps_move_by_what_they_report(outer: PPO | VPG) -> None:
    """PPO and VPG step the trainer's optimizer (plain SGD here): the weights move, the reported norm is the
    whole move (PPO) or the meta-gradient's norm, which SGD with lr 1 moves by (VPG), and no gradient is
    left behind by PPO."""
    tasks, algorithm = make(inner_lr=0.1, episodes=4, outer=outer)
    before = torch.cat([v.detach().reshape(-1).clone() for v in algorithm.policy_params().values()])
    optimizer = torch.optim.SGD(algorithm.parameters(), lr=1.0 if isinstance(outer, VPG) else 0.01)
    _, norm = algorithm.update(tasks.sample(3, "train", torch.Generator().manual_seed(2)), optimizer)
    moved = (torch.cat([v.detach().reshape(-1) for v in algorithm.policy_params().values()]) - before).norm()
    assert norm > 0 and norm == pytest.approx(float(moved), rel=1e-5)
    if isinstance(outer, PPO):
        assert all(p.grad is None for p in algorithm.parameters())


def test_surrogate_terms_by_hand() -> None:
    """Two tasks, one with a padded step: the objective is the per-task masked mean of ratio * A, then the
    mean over tasks; PPO's clipping takes min(r A, clip(r) A) per step."""
    ratio = torch.tensor([[[1.5], [0.5]], [[1.0], [2.0]]])
    advantages = torch.tensor([[[1.0], [-2.0]], [[3.0], [1.0]]])
    mask = torch.tensor([[[1.0], [1.0]], [[1.0], [0.0]]])
    terms = Surrogate(ratio, advantages, torch.tensor([[[0.1], [0.3]], [[0.2], [9.0]]]), mask)
    assert terms.objective().item() == pytest.approx(((1.5 - 1.0) / 2 + 3.0) / 2)
    # clip 0.2: task 0 min(1.5, 1.2) = 1.2 and min(-1.0, -1.6) = -1.6; task 1 min(3.0, 3.0) = 3.0.
    assert terms.clipped(0.2).item() == pytest.approx(((1.2 - 1.6) / 2 + 3.0) / 2)
    assert terms.mean_kl().item() == pytest.approx(((0.1 + 0.3) / 2 + 0.2) / 2)


def test_evaluation_does_not_depend_on_batching() -> None:
    tasks, algorithm = make(inner_lr=0.1, episodes=4, eval_inner_steps=2)
    whole = algorithm.evaluate(next(fixed_batches(tasks, "test", 3, seed=2, batch_size=3)))
    parts = [algorithm.evaluate(b) for b in fixed_batches(tasks, "test", 3, seed=2, batch_size=1)]
    for k in range(3):
        separately = torch.cat([p.extra[f"return_step{k}"] for p in parts])
        torch.testing.assert_close(whole.extra[f"return_step{k}"], separately)
    torch.testing.assert_close(whole.score, whole.extra["return_step2"])
    torch.testing.assert_close(whole.score_pre, whole.extra["return_step0"])


def test_short_run_on_navigation_adapts() -> None:
    """Twenty TRPO meta-steps on 2D navigation (horizon 50): the policy-gradient step now raises the
    return on held-out goals, and the post-adaptation return beats the untrained policy's."""
    tasks, algorithm = make(env=Navigation2D(horizon=50), hidden=32, inner_lr=0.1, episodes=10, eval_inner_steps=1)
    test = EnvTaskBatch.cat(list(fixed_batches(tasks, "test", 20, seed=2, batch_size=20)))
    untrained = algorithm.evaluate(test)
    generator, optimizer = torch.Generator().manual_seed(0), torch.optim.Adam(algorithm.parameters())
    for _ in range(20):
        algorithm.update(tasks.sample(10, "train", generator), optimizer)
    trained = algorithm.evaluate(test)
    gain = trained.extra["return_step1"] - trained.extra["return_step0"]
    assert gain.mean() > 3 * gain.std() / 20**0.5  # adaptation helps, beyond noise
    assert trained.score.mean() > untrained.score.mean() + 5


def test_evaluation_steps_follow_their_own_sizes_and_episodes() -> None:
    """evaluate() takes its k-th step with eval_inner_lrs[k] (the last repeating) on eval_episodes
    trajectories: the same as stepping by hand."""
    tasks, algorithm = make(inner_lr=0.1, episodes=2, eval_episodes=3, eval_inner_steps=3, eval_inner_lrs=[0.5, 0.25])
    batch = tasks.sample(2, "test", torch.Generator().manual_seed(4))
    scores = algorithm.evaluate(batch)
    params, shared = algorithm.policy_params(), True
    for step, lr in enumerate((0.5, 0.25, 0.25)):
        trajectories = algorithm.sample(batch, params, shared, 1000 + step, episodes=3)
        assert trajectories.episodes == 3
        torch.testing.assert_close(scores.extra[f"return_step{step}"], trajectories.task_returns())
        data = algorithm.task_data(trajectories, algorithm._advantages(trajectories))
        with torch.no_grad():
            params, shared = algorithm.inner_step(params, shared, data, create_graph=False, lr=lr), False
    final = algorithm.sample(batch, params, shared, 1003, episodes=3).task_returns()
    torch.testing.assert_close(scores.score, final)
    assert not torch.equal(scores.extra["return_step2"], scores.extra["return_step1"])


def test_bad_settings_are_named() -> None:
    model = MLP(2, 2, hidden_sizes=[4])
    for kwargs, message in (({"outer": "ppo"}, "outer='ppo': an object, not a name; in a config choose it with "
                                                "algorithm/outer=ppo"),
                            ({"inner_steps": -1}, "inner_steps=-1"), ({"gamma": 1.5}, "gamma=1.5"),
                            ({"eval_inner_lrs": []}, r"eval_inner_lrs=\[\]"),
                            ({"eval_episodes": 0}, "eval_episodes=0")):
        with pytest.raises(ValueError, match=message):
            MAMLRL(model, EnvTasks(Navigation2D()).objective, **kwargs)  # type: ignore[arg-type]
    for make_step, message in ((lambda: TRPO(max_kl=0.0), "max_kl=0.0"),
                               (lambda: TRPO(line_search_backtrack=1.0), "line_search_backtrack=1.0"),
                               (lambda: PPO(epochs=0), "epochs=0"), (lambda: PPO(clip=-0.1), "clip=-0.1")):
        with pytest.raises(ValueError, match=message):
            make_step()
