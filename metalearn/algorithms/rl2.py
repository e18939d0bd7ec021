"""RL²: fast reinforcement learning via slow reinforcement learning (Duan et al., 2016; Wang et al., 2016).

A recurrent policy (metalearn.models.recurrent.RecurrentPolicy) plays a *trial*: `episodes_per_trial`
episodes of the same task, its hidden state carried from one episode to the next and fed the previous
action, reward and done flag, so that adaptation to the task happens in its hidden state, not its
weights. The outer loop trains the weights across tasks by advantage actor-critic on whole trials
(as Wang et al.; Duan et al. used TRPO): the trial is one long episode, so the value of what an early
episode reveals flows back to it through the discounted return; GAE(λ) advantages, a value loss and
an entropy bonus, one step of the trainer's optimizer per meta-batch.

Evaluation plays one trial per task (or `trials_per_task`) and reports the return of every episode
of the trial (`return_episode1` …, up to 10 episodes), the first episode's as "before adaptation"
and the last episode's (or, with `score=mean`, the mean over the trial) as "after". On bandits it
also reports the trial's cumulative expected regret (`regret`) beside Thompson sampling's and
UCB1's on the same tasks (`regret_thompson`, `regret_ucb`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, cast

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from metalearn.algorithms.base import GradientLearner, StepResult, TaskScores
from metalearn.algorithms.policy import PolicyLearner
from metalearn.checks import positive_int
from metalearn.models.recurrent import RecurrentPolicy
from metalearn.objectives import Objective
from metalearn.rl.bandits import expected_regret, thompson_sampling, ucb1
from metalearn.rl.envs import Bandit, BatchEnv, Navigation2D
from metalearn.rl.pictures import navigation_figure
from metalearn.rl.rollout import categorical_sample, draw_noise, gae, gaussian_log_prob, masked_mean, normalize
from metalearn.rl.tasks import EnvTaskBatch
from metalearn.tasks import TaskSampler

MAX_EPISODE_METRICS = 10  # per-episode returns reported for trials of at most this many episodes


class TrialData(NamedTuple):
    """Trials of a batch of tasks, slot-major [S, N] with S = episodes × horizon slots and N = tasks ×
    trials (task-major): the policy's inputs, actions, rewards, whether each slot is a step of an
    episode (an episode that ended early leaves empty slots) and the episode each slot belongs to."""

    inputs: Tensor  # [S, N, input_size]
    actions: Tensor  # [S, N] (discrete) or [S, N, A]
    rewards: Tensor  # [S, N]
    alive: Tensor  # [S, N] bool
    episode: Tensor  # [S] long

    def episode_returns(self, episodes: int) -> Tensor:
        """Return of every episode of every trial, [N, episodes]."""
        out = torch.zeros(episodes, self.rewards.shape[1], dtype=self.rewards.dtype)
        return out.index_add_(0, self.episode, self.rewards).T


class RL2(PolicyLearner, GradientLearner[EnvTaskBatch]):
    """RL² with a recurrent policy trained by advantage actor-critic over trials.

    Args:
        model: a RecurrentPolicy sized for the environment.
        objective: the task family's objective (returns).
        episodes_per_trial: episodes of the same task the hidden state is carried across.
        trials_per_task: trials of each task of a meta-batch (and of each evaluation task).
        gamma / gae_lambda: discount and GAE λ across the whole trial.
        value_coef / entropy_coef: weights of the value loss and the entropy bonus.
        normalize_advantages: normalise the advantages over the meta-batch.
        score: the headline metric, "after adaptation": the last episode's return ("last"), or the mean
            episode return over the whole trial ("mean": for bandits, the reward per pull, which counts
            the cost of exploring).
        reward_scale: rewards are multiplied by this for the value targets and advantages (returns of
            order 1 keep the value loss from swamping the policy's gradient); reported returns are not.
    """

    model_predicts_targets = False

    def __init__(self, model: nn.Module, objective: Objective, episodes_per_trial: int = 2, trials_per_task: int = 1,
                 gamma: float = 0.99, gae_lambda: float = 0.95, value_coef: float = 0.5, entropy_coef: float = 0.01,
                 normalize_advantages: bool = True, score: str = "last", reward_scale: float = 1.0) -> None:
        super().__init__(model, objective)
        if not getattr(model, "recurrent", False):
            raise ValueError(f"RL² needs a recurrent policy that carries its state across episodes (model=gru_policy), "
                             f"not {type(model).__name__}")
        if not (0 < gamma <= 1 and 0 <= gae_lambda <= 1):
            raise ValueError(f"gamma={gamma}, gae_lambda={gae_lambda}: need 0 < gamma <= 1 and 0 <= gae_lambda <= 1")
        if value_coef < 0 or entropy_coef < 0:
            raise ValueError(f"value_coef={value_coef}, entropy_coef={entropy_coef}: must be >= 0")
        if score not in ("last", "mean"):
            raise ValueError(f"score={score!r}: must be 'last' (the last episode's return) or 'mean' (over the trial)")
        self.score = score
        if not reward_scale > 0:
            raise ValueError(f"reward_scale={reward_scale}: must be > 0")
        self.reward_scale = reward_scale
        self.episodes_per_trial = positive_int("episodes_per_trial", episodes_per_trial)
        self.trials_per_task = positive_int("trials_per_task", trials_per_task)
        self.gamma, self.gae_lambda = gamma, gae_lambda
        self.value_coef, self.entropy_coef, self.normalize_advantages = value_coef, entropy_coef, normalize_advantages

    def setup(self, tasks: TaskSampler) -> None:
        super().setup(tasks)
        env = self._env()
        sizes = (self.policy.observation_size, self.policy.action_size, self.policy.discrete)
        if sizes != (env.observation_size, env.action_size, env.discrete):
            raise ValueError(f"the policy (observation_size={sizes[0]}, action_size={sizes[1]}, discrete={sizes[2]}) "
                             f"does not fit the environment ({env.observation_size}, {env.action_size}, "
                             f"{env.discrete}): set model.observation_size/action_size/discrete")

    @property
    def policy(self) -> RecurrentPolicy:
        return cast(RecurrentPolicy, self.model)

    # -- trials -------------------------------------------------------------------------------------
    def _act(self, out: Tensor, noise: Tensor) -> Tensor:
        if self._env().discrete:
            return categorical_sample(out, noise)
        assert self.policy.log_std is not None
        return out + self.policy.log_std.exp() * noise

    @torch.no_grad()
    def run_trials(self, batch: EnvTaskBatch, purpose: int) -> TrialData:
        """One trial per task and trial slot, every task's noise from its own seed."""
        env, model = self._env(), self.policy
        k, trials, horizon = self.episodes_per_trial, self.trials_per_task, env.horizon
        tasks = len(batch)
        n = tasks * trials
        noise = draw_noise(env, batch.generators(purpose), episodes=k * trials)

        def episode_rows(x: Tensor, episode: int) -> Tensor:  # [T, tasks·k·trials, ...] -> [T, n, ...]
            return x.view(x.shape[0], tasks, k, trials, *x.shape[2:])[:, :, episode].reshape(x.shape[0], n,
                                                                                            *x.shape[2:])

        params = batch.params.repeat_interleave(trials, 0)
        state = model.initial_state(n)
        action = torch.full((n,), env.action_size) if env.discrete else torch.zeros(n, env.action_size)  # none yet
        reward, done = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
        inputs, actions, rewards, alives, episodes = [], [], [], [], []
        for episode in range(k):
            policy_noise, env_noise = episode_rows(noise.policy, episode), episode_rows(noise.env, episode)
            seeds = noise.seeds.view(tasks, k, trials)[:, episode].reshape(n)
            observation = env.reset(params, seeds)
            alive = torch.ones(n, dtype=torch.bool)
            for t in range(horizon):
                step_input = model.encode(observation, action, reward, done)
                out, _, state = model.step(step_input, state, alive)
                new_action = self._act(out, policy_noise[t])
                observation, new_reward, terminated = env.step(new_action, env_noise[t])
                new_reward = new_reward * alive
                inputs.append(step_input)
                actions.append(new_action)
                rewards.append(new_reward)
                alives.append(alive)
                episodes.append(episode)
                keep = alive.unsqueeze(-1) if new_action.dim() > 1 else alive
                action = torch.where(keep, new_action, action)
                reward = torch.where(alive, new_reward, reward)
                done = torch.where(alive, terminated | (t == horizon - 1), done)
                alive = alive & ~terminated
                if not alive.any():
                    break
        return TrialData(torch.stack(inputs), torch.stack(actions), torch.stack(rewards), torch.stack(alives),
                         torch.tensor(episodes))

    def _task_episode_returns(self, data: TrialData, tasks: int) -> Tensor:
        """Mean over trials of each episode's return, [tasks, episodes]."""
        returns = data.episode_returns(self.episodes_per_trial)
        return returns.view(tasks, self.trials_per_task, -1).mean(1)

    # -- training -----------------------------------------------------------------------------------
    def losses(self, data: TrialData) -> tuple[Tensor, Tensor, Tensor]:
        """Policy-gradient loss, value loss and mean entropy of the trials."""
        out, values = self.policy.unroll(data.inputs, data.alive)
        mask = data.alive.to(values.dtype)
        if self._env().discrete:
            log_probs = out.log_softmax(-1)
            log_prob = log_probs.gather(-1, data.actions.long().unsqueeze(-1)).squeeze(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
        else:
            log_std = self.policy.log_std
            assert log_std is not None
            log_prob = gaussian_log_prob(out, log_std, data.actions)
            entropy = (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum().expand_as(log_prob)
        rewards = data.rewards * self.reward_scale  # the value head fits scaled returns
        advantages = gae(rewards, values.detach() * mask, mask, self.gamma, self.gae_lambda)
        returns = advantages + values.detach()
        if self.normalize_advantages:
            advantages = normalize(advantages, mask)
        return (-masked_mean(log_prob * advantages, mask), masked_mean((values - returns) ** 2, mask),
                masked_mean(entropy, mask))

    def meta_train_step(self, batch: EnvTaskBatch) -> StepResult:
        data = self.run_trials(batch, purpose=0)
        policy_loss, value_loss, entropy = self.losses(data)
        (policy_loss + self.value_coef * value_loss - self.entropy_coef * entropy).backward()
        returns = self._task_episode_returns(data, len(batch))
        first, after = returns[:, 0].mean().item(), self._after(returns).mean().item()
        return StepResult(meta_loss=-after, meta_loss_pre=-first, score=after, score_pre=first)

    def _after(self, returns: Tensor) -> Tensor:
        """The headline score of each task from its episode returns [tasks, episodes]."""
        return returns[:, -1] if self.score == "last" else returns.mean(1)

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, batch: EnvTaskBatch) -> TaskScores:
        data = self.run_trials(batch, purpose=1000)
        returns = self._task_episode_returns(data, len(batch))
        extra: dict[str, Tensor] = {}
        if self.episodes_per_trial <= MAX_EPISODE_METRICS:
            extra = {f"return_episode{k + 1}": returns[:, k] for k in range(self.episodes_per_trial)}
        if isinstance(self._env(), Bandit):
            extra.update(self.bandit_regrets(batch, data))
        after = self._after(returns)
        return TaskScores(loss=-after, loss_pre=-returns[:, 0], score=after, score_pre=returns[:, 0], extra=extra)

    def bandit_regrets(self, batch: EnvTaskBatch, data: TrialData) -> dict[str, Tensor]:
        """Cumulative expected regret over the trial: RL²'s, Thompson sampling's and UCB1's (each task's
        baselines with their own generator from the task's seed)."""
        pulls = self.episodes_per_trial
        params = batch.params.repeat_interleave(self.trials_per_task, 0)
        ours = expected_regret(params, data.actions.T)[:, -1].view(len(batch), -1).mean(1)
        out = {"regret": ours}
        for name, player in (("thompson", thompson_sampling), ("ucb", ucb1)):
            out[f"regret_{name}"] = torch.stack([
                expected_regret(batch.params[i:i + 1], player(batch.params[i:i + 1], pulls, generator))[0, -1]
                for i, generator in enumerate(batch.generators(2000))])
        return out

    # -- pictures -------------------------------------------------------------------------------------
    def illustrate(self, tasks: TaskSampler, generator: torch.Generator) -> Figure | None:
        env = self._env()
        if isinstance(env, Bandit):
            return self._regret_figure(tasks, generator)
        if isinstance(env, Navigation2D):
            return self._paths_figure(tasks, generator)
        return None

    def _regret_figure(self, tasks: TaskSampler, generator: torch.Generator, n: int = 200) -> Figure:
        batch = tasks.sample(n, "test", generator)  # type: ignore[arg-type]
        assert isinstance(batch, EnvTaskBatch)
        data = self.run_trials(batch, purpose=1000)
        pulls = self.episodes_per_trial
        params = batch.params.repeat_interleave(self.trials_per_task, 0)
        curves = {"RL²": expected_regret(params, data.actions.T).mean(0)}
        for name, player in (("Thompson sampling", thompson_sampling), ("UCB1", ucb1)):
            curves[name] = torch.cat([expected_regret(batch.params[i:i + 1], player(batch.params[i:i + 1], pulls, g))
                                      for i, g in enumerate(batch.generators(2000))]).mean(0)
        curves["uniformly random arm"] = (batch.params.max(1).values - batch.params.mean(1)).mean() * torch.arange(
            1, pulls + 1)
        figure = Figure(figsize=(6, 4))
        ax = figure.subplots()
        for name, curve in curves.items():
            ax.plot(range(1, pulls + 1), curve.numpy(), label=name)
        ax.set_xlabel("pull")
        ax.set_ylabel("cumulative expected regret")
        ax.set_title(f"{env_name(self._env())}: mean over {n} test bandits")
        ax.grid(alpha=0.3)
        ax.legend()
        figure.tight_layout()
        return figure

    def _paths_figure(self, tasks: TaskSampler, generator: torch.Generator, n: int = 4) -> Figure:
        batch = tasks.sample(n, "test", generator)  # type: ignore[arg-type]
        assert isinstance(batch, EnvTaskBatch)
        data = self.run_trials(batch, purpose=1000)
        rows = [i * self.trials_per_task for i in range(n)]
        paths = [[(f"episode {k + 1}", data.inputs[(data.episode == k) & data.alive[:, row], row, :2])
                  for k in range(self.episodes_per_trial)] for row in rows]  # positions each step starts from
        return navigation_figure(batch.params, paths, "RL² on 2D navigation: the episodes of one trial (★ goal)")


def env_name(env: BatchEnv) -> str:
    return f"{getattr(env, 'arms', '')}-armed bandits" if isinstance(env, Bandit) else type(env).__name__
