"""Model-Agnostic Meta-Learning (MAML) and its first-order approximation.

The inner loop takes plain gradient steps on each task's support set from a shared initialisation;
the outer loop differentiates the adapted model's query loss with respect to that initialisation,
through the inner steps (second order) or treating the inner gradients as constants (first order).

References:
    Finn, C., Abbeel, P. and Levine, S. (2017). Model-Agnostic Meta-Learning for Fast Adaptation
    of Deep Networks. ICML. https://arxiv.org/abs/1703.03400
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from metalearn.algorithms.base import MetaAlgorithm, StepResult, TaskScores
from metalearn.algorithms.functional import Params, buffers_of, detach_all, forward_with, params_of, sgd_step
from metalearn.checks import non_negative_float, positive_int
from metalearn.models.norm import set_adaptation_step
from metalearn.objectives import Objective
from metalearn.tasks import Task, TaskBatch


def running_statistics(model: nn.Module) -> list[str]:
    """Names of the model's normalisation layers that update running statistics while training."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def choose_vectorize(model: nn.Module, vectorize: bool | str) -> bool:
    """Resolve `vectorize` (true, false or "auto") for `model`; a clear error for a combination vmap cannot run."""
    if vectorize == "auto":
        convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        return not convolutional and not running_statistics(model)
    if not isinstance(vectorize, bool):
        raise ValueError(f"vectorize={vectorize!r}: must be true, false or auto")
    if vectorize and running_statistics(model):
        raise ValueError(f"vectorize=True: the model's BatchNorm layers ({running_statistics(model)[0]}, ...) keep "
                         "running statistics, which vmap cannot update per task; set vectorize to false or auto, "
                         "or use batch statistics only (model.norm=batch)")
    return vectorize


class MAML(MetaAlgorithm):
    """MAML with true second-order meta-gradients by default.

    Args:
        model: the base model whose initialisation is meta-learned.
        objective: the task family's loss and metric.
        inner_lr: step size of the inner SGD steps.
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at evaluation (defaults to `inner_steps`).
        first_order: treat inner gradients as constants (FOMAML).
        vectorize: process the meta-batch with `torch.func.vmap` (true) or a loop over tasks (false).
            Both give the same gradients; vmap pays for small, dispatch-bound models such as the
            sinusoid MLP and costs time and memory for convolutional ones on CPU (docs/performance.md).
            "auto" (the default) picks vmap unless the model has convolutions or BatchNorm running
            statistics (which vmap cannot update per task).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        vectorize: bool | str = "auto",
    ) -> None:
        super().__init__(model, objective)
        self.inner_lr = non_negative_float("inner_lr", inner_lr)
        self.inner_steps = positive_int("inner_steps", inner_steps)
        self.eval_inner_steps = positive_int(
            "eval_inner_steps", inner_steps if eval_inner_steps is None else eval_inner_steps
        )
        self.first_order = bool(first_order)
        self.vectorize = choose_vectorize(model, vectorize)

    def inner_update(self, params: Params, grads: Params, step: int) -> Params:
        """One inner step; subclasses with learned step sizes override this."""
        return sgd_step(params, grads, self.inner_lr)

    def _inner_loop(
        self, params: Params, buffers: Params, x: Tensor, y: Tensor, steps: int, create_graph: bool
    ) -> Params:
        """The one inner loop, shared by training, evaluation and `adapt`."""

        def support_loss(p: Params) -> Tensor:
            return self.objective.loss(forward_with(self.model, p, buffers, x), y)

        for step in range(steps):
            set_adaptation_step(self.model, step)
            grads = self._gradients(support_loss, params, create_graph)
            params = self.inner_update(params, grads, step)
        set_adaptation_step(self.model, None)
        return params

    def _gradients(self, loss_fn: Callable[[Params], Tensor], params: Params, create_graph: bool) -> Params:
        """Gradients of `loss_fn` at `params`; differentiable by the outer pass iff `create_graph`.

        Under vmap only torch.func.grad transforms correctly. On the per-task path autograd.grad is
        about 4x faster for small models (less dispatch), so each path uses its own engine.
        """
        # First order: differentiate at a detached copy, so the gradient is a constant to the outer
        # pass (and costs no second-order graph) while the update still flows through the identity path.
        if self.vectorize:
            return grad(loss_fn)(params if create_graph else detach_all(params))
        with torch.enable_grad():
            at = params if create_graph else {k: p.detach().requires_grad_() for k, p in params.items()}
            values = torch.autograd.grad(loss_fn(at), list(at.values()), create_graph=create_graph,
                                         allow_unused=True, materialize_grads=True)
        return dict(zip(at, values))

    def _task_outcome(
        self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
        query_y: Tensor, *, steps: int, create_graph: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Query loss after adaptation (differentiable), then detached pre-loss, score, pre-score."""
        with torch.no_grad():
            set_adaptation_step(self.model, 0)
            before = forward_with(self.model, params, buffers, query_x)
        adapted = self._inner_loop(params, buffers, support_x, support_y, steps, create_graph)
        after = forward_with(self.model, adapted, buffers, query_x)
        loss = self.objective.loss(after, query_y)
        return (
            loss,
            self.objective.loss(before, query_y),
            self.objective.score(after.detach(), query_y),
            self.objective.score(before, query_y),
        )

    def _batch_outcome(self, batch: TaskBatch, *, steps: int, create_graph: bool) -> tuple[Tensor, ...]:
        params, buffers = params_of(self.model), buffers_of(self.model)
        fn = partial(self._task_outcome, steps=steps, create_graph=create_graph)
        tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        if self.vectorize:
            return vmap(fn, in_dims=(None, None, 0, 0, 0, 0))(params, buffers, *tensors)
        per_task = [fn(params, buffers, *task_tensors) for task_tensors in zip(*tensors)]
        return tuple(torch.stack(values) for values in zip(*per_task))

    def adapt(self, task: Task, *, create_graph: bool = False, steps: int | None = None) -> Params:
        if steps is None:
            steps = self.inner_steps if self.training else self.eval_inner_steps
        params, buffers = params_of(self.model), buffers_of(self.model)
        return self._inner_loop(params, buffers, task.support_x, task.support_y, steps, create_graph)

    def meta_train_step(self, batch: TaskBatch) -> StepResult:
        loss, loss_pre, score, score_pre = self._batch_outcome(
            batch, steps=self.inner_steps, create_graph=not self.first_order
        )
        meta_loss = loss.mean()
        meta_loss.backward()
        return StepResult(meta_loss.item(), loss_pre.mean().item(), score.mean().item(), score_pre.mean().item())

    def evaluate(self, batch: TaskBatch) -> TaskScores:
        with torch.no_grad():
            outcome = self._batch_outcome(batch, steps=self.eval_inner_steps, create_graph=False)
        return TaskScores(*(value.detach() for value in outcome))
