"""MAML for reinforcement learning (Finn et al., 2017, section 5.3).

Inner loop: vanilla policy gradient (REINFORCE with a linear feature baseline fitted to the task's own
episodes, advantages normalised per task) on `episodes` trajectories of the task, `inner_steps` SGD
steps of size `inner_lr` on every policy parameter, the Gaussian's log standard deviation included.

Outer loop, on fresh trajectories of each adapted policy: the importance-weighted surrogate of the
post-adaptation returns, differentiated through the inner policy-gradient steps (second order unless
`first_order`), improved by the `outer` step (metalearn/rl/outer.py; the `algorithm/outer` config group):
- `TRPO` (the paper's): conjugate gradient on Fisher-vector products of the mean KL between the
  adapted policies before and after the step (products that also run through the inner steps), the
  step scaled to `max_kl` and a backtracking line search.
- `PPO`: `epochs` steps of the trainer's optimizer on PPO's clipped surrogate (Schulman et al., 2017),
  each re-adapting from the current meta-parameters.
- `VPG`: the meta-gradient of the surrogate, one step of the trainer's optimizer.

As in the paper's code, the meta-gradient runs through the inner update's dependence on the
meta-parameters but not through the distribution of the pre-adaptation trajectories.

Training with `inner_steps=0` trains one policy on the mixture of all tasks: the paper's "pretrained"
baseline, which is then fine-tuned at test time with `eval_inner_steps` steps.

Evaluation reports the mean episode return of each task before adaptation and after each of
`eval_inner_steps` policy-gradient steps (`return_step0` … `return_stepK`), each step on fresh
trajectories of the current policy: `eval_episodes` of them, with step sizes `eval_inner_lrs`. The
paper's test protocol (its code's test script for 2D navigation) took vanilla policy-gradient steps on
40 trajectories each, of size 0.5 for the first step and 0.25 for the later ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metalearn.algorithms.base import SelfUpdating, StepResult, TaskScores
from metalearn.algorithms.functional import Params, buffers_of
from metalearn.algorithms.policy import PolicyLearner
from metalearn.checks import positive_int
from metalearn.objectives import Objective
from metalearn.rl.envs import Navigation2D
from metalearn.rl.outer import TRPO, OuterStep, Surrogate
from metalearn.rl.pictures import navigation_figure
from metalearn.rl.rollout import (
    Trajectories,
    categorical_sample,
    draw_noise,
    gaussian_kl,
    gaussian_log_prob,
    linear_baseline_advantages,
    masked_mean,
    rollout,
)
from metalearn.rl.tasks import EnvTaskBatch
from metalearn.tasks import TaskSampler


class TaskData(NamedTuple):
    """One round of trajectories of every task, task-major: [B, T, E, ...] (tasks, time, episodes)."""

    observations: Tensor
    actions: Tensor
    advantages: Tensor
    mask: Tensor


class MAMLRL(PolicyLearner, SelfUpdating[EnvTaskBatch]):
    """MAML with policy-gradient inner steps and a TRPO (or PPO/VPG) outer step.

    Args:
        model: the policy network: observations -> action means (continuous) or logits (discrete).
        objective: the task family's objective (returns).
        inner_lr: step size of the inner policy-gradient steps.
        inner_steps: inner steps during meta-training (0: no adaptation, the pretrained baseline).
        eval_inner_steps: inner steps at evaluation (3: returns after 0-3 steps, as the paper reports them;
            None: `inner_steps`, at least 1).
        eval_inner_lrs: the step size of each evaluation step (the last one repeats for further steps);
            None: `inner_lr` for every step.
        episodes: trajectories per task for each inner step and for the outer objective.
        eval_episodes: trajectories per task for each step at evaluation (default: `episodes`).
        gamma / gae_lambda: discount and GAE λ of the advantages (λ = 1: returns minus the baseline).
        first_order: drop the second-order terms of the meta-gradient.
        outer: the outer step, an object of metalearn/rl/outer.py: TRPO (the paper's; None means
            TRPO()), PPO or VPG. In a config, the `algorithm/outer` group chooses it (trpo, ppo, vpg).
        init_std: the Gaussian policy's initial standard deviation (continuous actions).
    """

    def __init__(self, model: nn.Module, objective: Objective, inner_lr: float = 0.1, inner_steps: int = 1,
                 eval_inner_steps: int | None = 3, eval_inner_lrs: Sequence[float] | None = None,
                 episodes: int = 20, eval_episodes: int | None = None, gamma: float = 0.99,
                 gae_lambda: float = 1.0, first_order: bool = False, outer: OuterStep | None = None,
                 init_std: float = 1.0) -> None:
        super().__init__(model, objective)
        if isinstance(outer, str):
            raise ValueError(f"outer={outer!r}: an object, not a name; in a config choose it with "
                             f"algorithm/outer={outer} (options: conf/algorithm/outer/)")
        if inner_steps < 0:
            raise ValueError(f"inner_steps={inner_steps}: must be >= 0")
        if not (0 < gamma <= 1 and 0 <= gae_lambda <= 1):
            raise ValueError(f"gamma={gamma}, gae_lambda={gae_lambda}: need 0 < gamma <= 1 and 0 <= gae_lambda <= 1")
        if not init_std > 0:
            raise ValueError(f"init_std={init_std}: must be > 0")
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        if eval_inner_steps is not None and eval_inner_steps < 0:
            raise ValueError(f"eval_inner_steps={eval_inner_steps}: must be >= 0")
        self.eval_inner_steps = max(1, inner_steps) if eval_inner_steps is None else eval_inner_steps
        self.episodes = positive_int("episodes", episodes)
        self.eval_episodes = positive_int("eval_episodes", episodes if eval_episodes is None else eval_episodes)
        lrs = [float(lr) for lr in eval_inner_lrs] if eval_inner_lrs is not None else [inner_lr]
        if not lrs or not all(math.isfinite(lr) and lr >= 0 for lr in lrs):
            raise ValueError(f"eval_inner_lrs={eval_inner_lrs!r}: must be a non-empty list of step sizes >= 0")
        self.eval_inner_lrs = lrs
        self.gamma, self.gae_lambda, self.first_order = gamma, gae_lambda, first_order
        self.outer: OuterStep = TRPO() if outer is None else outer
        self.init_std = init_std
        self.log_std: nn.Parameter | None = None

    # -- set-up -------------------------------------------------------------------------------------
    def setup(self, tasks: TaskSampler) -> None:
        super().setup(tasks)
        env = self._env()
        if not env.discrete:
            self.log_std = nn.Parameter(torch.full((env.action_size,), float(torch.tensor(self.init_std).log())))

    def policy_params(self) -> Params:
        """The meta-parameters the inner loop adapts: the network's and the log standard deviation."""
        params: Params = dict(self.model.named_parameters())
        if self.log_std is not None:
            params["log_std"] = self.log_std
        return params

    # -- the policy, functionally ---------------------------------------------------------------------
    # Parameters are a dict: the meta-parameters themselves (`shared`, the same for every task) or one
    # stacked tensor per name with a leading task dimension (after adaptation). Task-major data has
    # shape [B, T, E, ...] (tasks, time, episodes).
    def _outputs(self, params: Params, observations: Tensor) -> Tensor:
        weights = {k: v for k, v in params.items() if k != "log_std"}
        return functional_call(self.model, {**weights, **buffers_of(self.model)}, (observations,))

    def _outputs_by_task(self, params: Params, shared: bool, observations: Tensor) -> Tensor:
        return self._outputs(params, observations) if shared else vmap(self._outputs)(params, observations)

    def _log_prob_one(self, params: Params, observations: Tensor, actions: Tensor) -> Tensor:
        """log π(a|s) of every step of one task's data (any leading shape)."""
        out = self._outputs(params, observations)
        if self._env().discrete:
            return out.log_softmax(-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        return gaussian_log_prob(out, params["log_std"], actions)

    def _log_prob_by_task(self, params: Params, shared: bool, observations: Tensor, actions: Tensor) -> Tensor:
        if shared:
            return self._log_prob_one(params, observations, actions)
        return vmap(self._log_prob_one)(params, observations, actions)

    def _actor(self, params: Params, shared: bool, tasks: int) -> Callable[[Tensor, Tensor], Tensor]:
        env = self._env()

        def act(observations: Tensor, noise: Tensor) -> Tensor:
            out = self._outputs_by_task(params, shared, observations.view(tasks, -1, observations.shape[-1]))
            out = out.reshape(len(observations), -1)
            if env.discrete:
                return categorical_sample(out, noise)
            log_std = params["log_std"]
            std = log_std.exp() if shared else log_std.exp().repeat_interleave(len(observations) // tasks, 0)
            return out + std * noise

        return act

    def sample(self, batch: EnvTaskBatch, params: Params, shared: bool, purpose: int,
               episodes: int | None = None) -> Trajectories:
        """`episodes` (default: the training setting) trajectories of every task of `batch`, with its noise
        for this `purpose`."""
        noise = draw_noise(self._env(), batch.generators(purpose), episodes or self.episodes)
        detached = {k: v.detach() for k, v in params.items()}
        return rollout(self._actor(detached, shared, len(batch)), self._env(), batch.params, noise)

    def task_data(self, trajectories: Trajectories, advantages: Tensor) -> TaskData:
        """Observations, actions, advantages and mask, task-major [B, T, E, ...]."""
        b, e = trajectories.tasks, trajectories.episodes

        def by_task(x: Tensor) -> Tensor:
            return x.view(x.shape[0], b, e, *x.shape[2:]).transpose(0, 1)

        return TaskData(by_task(trajectories.observations), by_task(trajectories.actions), by_task(advantages),
                        by_task(trajectories.mask))

    # -- the inner loop -------------------------------------------------------------------------------
    def inner_loss(self, params: Params, observations: Tensor, actions: Tensor, advantages: Tensor,
                   mask: Tensor) -> Tensor:
        """The policy-gradient loss of one task: −mean over its steps of log π(a|s)·A."""
        return -masked_mean(self._log_prob_one(params, observations, actions) * advantages, mask)

    def inner_step(self, params: Params, shared: bool, data: TaskData, create_graph: bool,
                   lr: float | None = None) -> Params:
        """One policy-gradient SGD step (of size `lr`, default `inner_lr`) of every task at once (vmap over
        tasks): the adapted parameters, stacked. With `create_graph` they are differentiable functions of
        `params` (second order)."""
        lr = self.inner_lr if lr is None else lr

        def step(p: Params, *task: Tensor) -> Params:
            grads = grad(self.inner_loss)(p, *task)
            if not create_graph:
                grads = {k: g.detach() for k, g in grads.items()}
            return {k: p[k] - lr * grads[k] for k in p}

        return vmap(step, in_dims=(None if shared else 0, 0, 0, 0, 0))(params, *data)

    def _advantages(self, trajectories: Trajectories) -> Tensor:
        return linear_baseline_advantages(trajectories, self.gamma, self.gae_lambda)

    def _adapt_all(self, batch: EnvTaskBatch, steps: int, purpose: int, testing: bool = False
                   ) -> tuple[Params, bool, list[TaskData], list[Tensor]]:
        """Adapt every task of `batch` by `steps` inner steps, each on fresh trajectories of the current
        policy (with the evaluation settings if `testing`): the adapted parameters (and whether they are
        still the shared meta-parameters), each step's task-major data, and each step's mean episode
        return per task."""
        params, shared = self.policy_params(), True
        data, returns = [], []
        for step in range(steps):
            trajectories = self.sample(batch, params, shared, purpose + step,
                                       self.eval_episodes if testing else self.episodes)
            returns.append(trajectories.task_returns())
            data.append(self.task_data(trajectories, self._advantages(trajectories)))
            lr = self.eval_inner_lrs[min(step, len(self.eval_inner_lrs) - 1)] if testing else self.inner_lr
            with torch.no_grad():
                params, shared = self.inner_step(params, shared, data[-1], create_graph=False, lr=lr), False
        return params, shared, data, returns

    def readapt(self, data: list[TaskData]) -> tuple[Params, bool]:
        """The adapted parameters as functions of the current meta-parameters, on fixed trajectories."""
        params, shared = self.policy_params(), True
        for task_data in data:
            params, shared = self.inner_step(params, shared, task_data, create_graph=not self.first_order), False
        return params, shared

    # -- the outer loop -------------------------------------------------------------------------------
    def outer_terms(self, params: Params, shared: bool, post: TaskData, old_log_prob: Tensor, old_out: Tensor,
                    old_log_std: Tensor | None) -> Surrogate:
        """The importance ratios, advantages and KL(old ‖ new) of every step of the post-adaptation
        trajectories under `params`."""
        observations, actions, advantages, mask = post
        ratio = (self._log_prob_by_task(params, shared, observations, actions) - old_log_prob).exp()
        out = self._outputs_by_task(params, shared, observations)
        if self._env().discrete:
            old = old_out.log_softmax(-1)
            kl = (old.exp() * (old - out.log_softmax(-1))).sum(-1)
        else:
            assert old_log_std is not None
            log_std = params["log_std"] if shared else params["log_std"].view(len(out), 1, 1, -1)
            kl = gaussian_kl(old_out, old_log_std.view(len(out), 1, 1, -1), out, log_std)
        return Surrogate(ratio, advantages, kl, mask)

    def update(self, batch: EnvTaskBatch, optimizer: torch.optim.Optimizer) -> tuple[StepResult, float]:
        """One meta-update on `batch` by the outer step: a TRPO step (its own rule), PPO's epochs of
        `optimizer` steps on the clipped surrogate, or one `optimizer` step on the policy-gradient
        surrogate (VPG). Returns the metrics and the update's length (VPG: the gradient's norm)."""
        adapted, shared, data, returns = self._adapt_all(batch, self.inner_steps, purpose=0)
        trajectories = self.sample(batch, adapted, shared, purpose=self.inner_steps)
        post = self.task_data(trajectories, self._advantages(trajectories))
        post_return = trajectories.task_returns().mean().item()
        pre_return = returns[0].mean().item() if returns else post_return
        with torch.no_grad():
            old_log_prob = self._log_prob_by_task(adapted, shared, post.observations, post.actions)
            old_out = self._outputs_by_task(adapted, shared, post.observations)
            old_log_std = None
            if "log_std" in adapted:
                old_log_std = adapted["log_std"].expand(len(batch), -1).clone()  # not a view: TRPO writes in place

        def surrogate() -> Surrogate:
            params, now_shared = self.readapt(data)
            return self.outer_terms(params, now_shared, post, old_log_prob, old_out, old_log_std)

        norm = self.outer(list(self.policy_params().values()), surrogate, optimizer)
        result = StepResult(meta_loss=-post_return, meta_loss_pre=-pre_return, score=post_return, score_pre=pre_return)
        return result, norm

    # -- evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, batch: EnvTaskBatch) -> TaskScores:
        """Mean episode return of each task before adaptation and after each of `eval_inner_steps` steps."""
        steps = self.eval_inner_steps
        adapted, shared, _, returns = self._adapt_all(batch, steps, purpose=1000, testing=True)
        final = self.sample(batch, adapted, shared, purpose=1000 + steps, episodes=self.eval_episodes).task_returns()
        per_step = [*returns, final]
        extra = {f"return_step{k}": r for k, r in enumerate(per_step)}
        return TaskScores(loss=-final, loss_pre=-per_step[0], score=final, score_pre=per_step[0], extra=extra)

    # -- pictures -------------------------------------------------------------------------------------
    def illustrate(self, tasks: TaskSampler, generator: torch.Generator) -> Figure | None:
        """2D navigation: for a few test goals, one episode of the policy before adaptation and after each
        policy-gradient step."""
        if not isinstance(self._env(), Navigation2D):
            return None
        batch = tasks.sample(4, "test", generator)
        assert isinstance(batch, EnvTaskBatch)
        steps = self.eval_inner_steps
        adapted, shared, data, _ = self._adapt_all(batch, steps, purpose=1000, testing=True)
        final = self.sample(batch, adapted, shared, purpose=1000 + steps, episodes=self.eval_episodes)
        rounds = [(d.observations, d.mask) for d in data]
        post = self.task_data(final, torch.zeros_like(final.rewards))
        rounds.append((post.observations, post.mask))
        paths = [[("before adaptation" if k == 0 else f"after {k} step{'s' if k > 1 else ''}",
                   observations[i, mask[i, :, 0] > 0, 0, :2]) for k, (observations, mask) in enumerate(rounds)]
                 for i in range(len(batch))]
        return navigation_figure(batch.params, paths, "MAML-RL on 2D navigation: one episode per policy (★ goal)")
