"""Reptile: move the initialisation towards the weights that plain training on each task reaches.

Each task's inner loop takes k steps of SGD or Adam on minibatches of its support set, from the
shared initialisation theta to phi. The meta-step is theta <- theta + eps * mean_tasks(phi - theta):
`meta_train_step` writes the pseudo-gradient mean_tasks(theta - phi) into `.grad`, so the trainer's
optimizer performs it (plain SGD with lr = eps gives the paper's update; the paper anneals eps
linearly to 0, `scheduler=linear`). Serial Reptile is a meta-batch of one task, batched Reptile a
meta-batch of n: the same code. Reptile is first order by construction: no inner gradient is ever
differentiated. The query set is only scored (meta_loss is the query loss after adaptation).

References:
    Nichol, A., Achiam, J. and Schulman, J. (2018). On First-Order Meta-Learning Algorithms.
    arXiv preprint. https://arxiv.org/abs/1803.02999
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metalearn.algorithms.base import StepResult
from metalearn.algorithms.functional import (
    CarriedState,
    InnerAdam,
    InnerOptimizer,
    InnerSGD,
    Params,
    forward_with,
    params_of,
)
from metalearn.algorithms.maml import MAML
from metalearn.checks import one_of, positive_int, true_false_auto
from metalearn.objectives import Objective
from metalearn.tasks import Task, TaskBatch

INNER_STATES = ("carried", "task")

# Evaluation draws its minibatches from this fixed seed, so scores do not depend on when they are
# taken; training step s uses seed s (a step index is never negative).
EVAL_SEED = -1


def minibatch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator,
                      key: str = "inner_batch_size") -> Tensor:
    """Indices into a support set of `n` examples for `steps` minibatches of `batch_size`, shape [steps, batch_size].

    As in the paper's code, the minibatches are consecutive chunks of a stream of fresh permutations
    of the support set: each epoch (n consecutive positions) visits every example once, and a
    minibatch straddles two epochs when `batch_size` does not divide `n`.
    """
    if batch_size > n:
        raise ValueError(f"{key}={batch_size}: larger than the support set ({n} examples); "
                         "use at most that or null for the full support set")
    epochs = -(-steps * batch_size // n)
    stream = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    return stream[: steps * batch_size].view(steps, batch_size)


class Reptile(MAML):
    """Reptile on MAML's functional inner loop, evaluation and vmap / per-task paths.

    Args:
        model: the base model whose initialisation is meta-learned.
        objective: the task family's loss and metric.
        inner_lr: step size of the inner optimizer (the paper's Adam: 0.001).
        inner_steps: inner steps during meta-training (the paper: 5 on Omniglot, 8 on Mini-ImageNet).
        eval_inner_steps: inner steps at evaluation (the paper: 50); None: `inner_steps`.
        inner_optimizer: InnerSGD, or InnerAdam (the paper's, with betas (0, 0.999); None means it).
        inner_state: where each task's inner optimizer state (Adam's moments and step count) starts.
            `carried` (the paper's code): meta-training carries it from each task to the next, in
            order through the meta-batch and across meta-steps, and evaluation starts every task from
            the carried state without changing it; it is saved in checkpoints, so a resumed run goes on
            from it. `task`: every task starts from zero moments. Carrying needs the per-task path
            (no vmap) and no compilation; with SGD there is no state and both are the same.
        inner_batch_size: support examples per inner step, drawn as consecutive chunks of fresh
            shuffles of the support set (the paper: 10). None: every step uses the full support set.
            The shuffles come from a generator seeded with the meta-step index given to
            `set_progress` (training mode) or with `EVAL_SEED` (eval mode), never from the global
            RNG, so a resumed run draws the same minibatches. All tasks of a meta-batch share them,
            which lets the vmap path batch the tasks.
        eval_inner_batch_size: the same at evaluation (the paper: 5, a 5-way 1-shot support set);
            None: `inner_batch_size`.
        first_order: must be true (accepted so that the configuration can extend MAML's).
        second_order_steps: must be None, for the same reason.
        vectorize: vmap over the meta-batch (true), loop over tasks (false), or auto (see MAML).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_lr: float = 0.001,
        inner_steps: int = 5,
        eval_inner_steps: int | None = 50,
        inner_optimizer: InnerOptimizer | None = None,
        inner_state: str = "carried",
        inner_batch_size: int | None = None,
        eval_inner_batch_size: int | None = None,
        first_order: bool = True,
        second_order_steps: int | None = None,
        vectorize: bool | str = "auto",
    ) -> None:
        if first_order is not True:
            raise ValueError(f"first_order={first_order!r}: Reptile is first order by construction; must be true")
        if second_order_steps is not None:
            raise ValueError(f"second_order_steps={second_order_steps!r}: Reptile never differentiates through "
                             "the inner loop; must be null")
        self.inner_state = one_of("inner_state", inner_state, INNER_STATES)
        if inner_optimizer is None:
            inner_optimizer = InnerAdam(betas=(0.0, 0.999))
        carried = self.inner_state == "carried" and not isinstance(inner_optimizer, InnerSGD)
        if carried and vectorize is True:
            raise ValueError("vectorize=True: inner_state=carried passes the inner optimizer's state from task "
                             "to task, in order; it needs vectorize=false or auto (or inner_state=task)")
        super().__init__(model, objective, inner_lr=inner_lr, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, first_order=True, inner_optimizer=inner_optimizer,
                         vectorize=False if carried else vectorize)
        self.carried: CarriedState | None = None
        if carried:
            self.optimizer = self.carried = CarriedState(self.optimizer)
        self.inner_batch_size = None if inner_batch_size is None else positive_int("inner_batch_size",
                                                                                   inner_batch_size)
        self.eval_inner_batch_size = (self.inner_batch_size if eval_inner_batch_size is None
                                      else positive_int("eval_inner_batch_size", eval_inner_batch_size))
        self.progress_step = 0

    def use_compile(self, compile: bool | str, device: torch.device) -> bool:
        """As MAML's, except that a carried inner state is never compiled: "auto" stays eager and true is
        refused (the state changes hands between tasks outside any one task's computation)."""
        if self.carried is not None:
            if true_false_auto("compile", compile) is True:
                raise ValueError("compile=true: inner_state=carried runs eagerly; set compile to false or auto "
                                 "(or inner_state=task)")
            compile = False
        return super().use_compile(compile, device)

    def get_extra_state(self) -> Any:
        """The carried inner optimizer state, saved in the state dict (and so in checkpoints)."""
        return {"inner_state": None if self.carried is None else self.carried.state}

    def set_extra_state(self, state: Any) -> None:
        if self.carried is not None:
            self.carried.state = state["inner_state"]

    def meta_train_step(self, batch: TaskBatch) -> StepResult:
        """MAML's step; a carried inner state is kept from each task's inner loop for the next."""
        if self.carried is None:
            return super().meta_train_step(batch)
        self.carried.record = True
        try:
            return super().meta_train_step(batch)
        finally:
            self.carried.record = False

    def set_progress(self, step: int, max_steps: int) -> None:
        self.progress_step = step

    def _batch_size(self) -> int | None:
        """Support examples per inner step in the current mode (training or evaluation)."""
        return self.inner_batch_size if self.training else self.eval_inner_batch_size

    def _support_stream(self, x: Tensor, y: Tensor, steps: int, dim: int) -> tuple[Tensor, Tensor]:
        """The support examples (along `dim`) that the inner steps see, in order: `steps` minibatches
        of `inner_batch_size` back to back, or the support set itself without minibatches.

        Drawn here, outside any vmap, because random operations cannot run inside one.
        """
        size = self._batch_size()
        if size is None:
            return x, y
        generator = torch.Generator().manual_seed(self.progress_step if self.training else EVAL_SEED)
        key = "inner_batch_size" if self.training else "eval_inner_batch_size"
        order = minibatch_indices(x.shape[dim], size, steps, generator, key).view(-1).to(x.device)
        return x.index_select(dim, order), y.index_select(dim, order)

    def inner_batch(self, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Inner step `step` trains on the step-th block of `inner_batch_size` examples of the support
        stream (see `_support_stream`), or on the full support set without minibatches."""
        size = self._batch_size()
        if size is None:
            return x, y
        return x[step * size:(step + 1) * size], y[step * size:(step + 1) * size]

    def outer_loss(self, trajectory: list[Params], buffers: Params, query_x: Tensor,
                   query_y: Tensor) -> tuple[Tensor, Tensor]:
        """The query loss after adaptation as value, with the gradient theta - phi.

        The inner gradients are constants (first order), so phi depends on theta through the identity
        alone, and <phi, stopgrad(theta - phi)> has gradient theta - phi. Adding it minus its own value
        leaves the reported loss unchanged while MAML's backward pass (the mean over tasks) writes the
        Reptile pseudo-gradient, on the vmap and the per-task paths alike.
        """
        phi, theta = trajectory[-1], params_of(self.model)
        with torch.no_grad():
            after = forward_with(self.model, phi, buffers, query_x)
            loss = self.objective.loss(after, query_y)
        pull = torch.stack([(p * (theta[name] - p).detach()).sum() for name, p in phi.items()]).sum()
        return loss + (pull - pull.detach()), after

    def _batch_outcome(self, batch: TaskBatch, *, steps: int, **options: Any) -> tuple[Tensor, ...]:
        support_x, support_y = self._support_stream(batch.support_x, batch.support_y, steps, dim=1)
        batch = TaskBatch(support_x, support_y, batch.query_x, batch.query_y)
        return super()._batch_outcome(batch, steps=steps, **options)

    def adapt(self, task: Task, *, create_graph: bool = False, steps: int | None = None) -> Params:
        """The task's adapted parameters. Differentiable with respect to the model's parameters only
        through the identity (first order), whatever `create_graph` says."""
        if steps is None:
            steps = self.inner_steps if self.training else self.eval_inner_steps
        support_x, support_y = self._support_stream(task.support_x, task.support_y, steps, dim=0)
        return super().adapt(Task(support_x, support_y, task.query_x, task.query_y), steps=steps)
