"""Model-Agnostic Meta-Learning (MAML) and its first-order approximation.

The inner loop takes plain gradient steps on each task's support set from a shared initialisation;
the outer loop differentiates the adapted model's query loss with respect to that initialisation,
through the inner steps (second order) or treating the inner gradients as constants (first order).

References:
    Finn, C., Abbeel, P. and Levine, S. (2017). Model-Agnostic Meta-Learning for Fast Adaptation
    of Deep Networks. ICML. https://arxiv.org/abs/1703.03400
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from metalearn.algorithms.base import FewShotLearner, StepResult, TaskScores
from metalearn.algorithms.functional import (
    InnerLearned,
    InnerOptimizer,
    InnerSGD,
    LearningRate,
    Params,
    buffers_of,
    detach_all,
    forward_with,
    params_of,
)
from metalearn.checks import non_negative_float, positive_int, true_false_auto
from metalearn.l2o.optimizer import load_update_rule
from metalearn.models.norm import set_adaptation_step
from metalearn.objectives import Objective
from metalearn.runtime import Compiled, is_convolutional
from metalearn.tasks import Task, TaskBatch


def running_statistics(model: nn.Module) -> list[str]:
    """Names of the model's normalisation layers that update running statistics while training."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def choose_vectorize(model: nn.Module, vectorize: bool | str) -> bool:
    """Resolve `vectorize` (true, false or "auto") for `model`; a clear error for a combination vmap cannot run."""
    if true_false_auto("vectorize", vectorize) == "auto":
        return not is_convolutional(model) and not running_statistics(model)
    if vectorize and running_statistics(model):
        raise ValueError(f"vectorize=True: the model's BatchNorm layers ({running_statistics(model)[0]}, ...) keep "
                         "running statistics, which vmap cannot update per task; set vectorize to false or auto, "
                         "or use batch statistics only (model.norm=batch)")
    return bool(vectorize)


class MAML(FewShotLearner):
    """MAML with true second-order meta-gradients by default.

    Args:
        model: the base model whose initialisation is meta-learned.
        objective: the task family's loss and metric.
        inner_lr: step size of the inner SGD steps.
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at evaluation (defaults to `inner_steps`).
        first_order: treat inner gradients as constants (FOMAML).
        inner_optimizer: the inner loop's optimizer: InnerSGD (the paper's; None means it), InnerAdam
            (differentiable, so second order flows through it), or a learned update rule (a module such as
            metalearn.l2o.optimizer.LSTMOptimizer): its weights are meta-parameters, learned with the
            initialisation through the inner steps (`inner_lr` unused). In a config, the
            `algorithm/inner_optimizer` group chooses it (sgd, adam, lstm).
        inner_optimizer_checkpoint: a learned optimizer's run (algorithm=l2o) or checkpoint file whose
            weights the learned update rule starts from (a run directory: its best checkpoint).
        learn_inner_optimizer: meta-learn the learned update rule's weights (false: keep them fixed).
        second_order_steps: differentiate only the first k inner steps to second order and treat the
            gradients of later steps as constants. Second-order memory grows with every
            differentiated step, so this bounds it (docs/performance.md). None: all steps.
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
        inner_optimizer: InnerOptimizer | nn.Module | None = None,
        inner_optimizer_checkpoint: str | None = None,
        learn_inner_optimizer: bool = True,
        second_order_steps: int | None = None,
        vectorize: bool | str = "auto",
    ) -> None:
        super().__init__(model, objective)
        self.inner_lr = non_negative_float("inner_lr", inner_lr)
        self.inner_steps = positive_int("inner_steps", inner_steps)
        self.eval_inner_steps = positive_int(
            "eval_inner_steps", inner_steps if eval_inner_steps is None else eval_inner_steps
        )
        self.first_order = bool(first_order)
        self.optimizer: InnerOptimizer
        if isinstance(inner_optimizer, str):
            raise ValueError(f"inner_optimizer={inner_optimizer!r}: an object, not a name; in a config choose it "
                             f"with algorithm/inner_optimizer={inner_optimizer} "
                             "(options: conf/algorithm/inner_optimizer/)")
        if isinstance(inner_optimizer, nn.Module):
            self.optimizer = InnerLearned(inner_optimizer)
            self.inner_rule = inner_optimizer  # a submodule: trained and checkpointed with the model
            if inner_optimizer_checkpoint is not None:
                load_update_rule(inner_optimizer, Path(inner_optimizer_checkpoint).expanduser())
            inner_optimizer.requires_grad_(bool(learn_inner_optimizer))
        else:
            self.optimizer = InnerSGD() if inner_optimizer is None else inner_optimizer
            if inner_optimizer_checkpoint is not None:
                raise ValueError(f"inner_optimizer_checkpoint={inner_optimizer_checkpoint!r}: needs a learned "
                                 f"inner_optimizer (e.g. algorithm=maml_lstm), not "
                                 f"{type(self.optimizer).__name__}")
        self.second_order_steps = (None if second_order_steps is None
                                   else positive_int("second_order_steps", second_order_steps))
        self.vectorize = choose_vectorize(model, vectorize)
        self._compiled: Compiled | None = None
        self._channels_last = False

    def use_compile(self, compile: bool | str, device: torch.device) -> bool:
        """Compile each task's training computation (inner loop, query loss, and with them the graph of
        the meta-gradient) with torch.compile. "auto" compiles on CPU for convolutional models on the
        per-task path, where it is measured to be faster (docs/performance.md); GPUs and vmap keep the
        eager path. The first training step pays the compilation (about half a minute for Conv-4).
        Compiled on CPU, a convolutional model keeps its weights, and the compiled computation its
        images, in the channels-last (NHWC) layout, which the compiled convolutions run faster on (the
        values are the same up to rounding)."""
        if true_false_auto("compile", compile) == "auto":
            compile = device.type == "cpu" and not self.vectorize and is_convolutional(self.model)
        elif compile and self.vectorize:
            raise ValueError("compile=true: compiles the per-task path; it needs algorithm.vectorize=false "
                             "(or auto, which loops for convolutional models)")
        self._compiled = Compiled(self._adapted_outcome) if compile else None
        self._channels_last = bool(compile) and device.type == "cpu" and is_convolutional(self.model)
        if self._channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in the stubs
        return bool(compile)

    def step_size(self, step: int) -> LearningRate:
        """The inner learning rate of inner step `step`: a number, or a tensor per parameter name.
        Subclasses with learned step sizes (Meta-SGD, MAML++) override this."""
        return self.inner_lr

    def inner_batch(self, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """The support examples inner step `step` trains on: all of them. Reptile's minibatches
        override this."""
        return x, y

    def inner_update(self, params: Params, grads: Params, step: int, state: Any) -> tuple[Params, Any]:
        """One inner step: the inner optimizer with this step's step size."""
        return self.optimizer.step(params, grads, self.step_size(step), state)

    def _inner_loop(
        self, params: Params, buffers: Params, x: Tensor, y: Tensor, steps: int, create_graph: bool,
        module: nn.Module | None = None,
    ) -> list[Params]:
        """The one inner loop, shared by training, evaluation and `adapt`: the parameters after each
        of the `steps` inner steps. `module` is what adapts, on inputs `x`: the model by default,
        ANIL's head on the features its body computed."""
        module = self.model if module is None else module
        trajectory, state = [], self.optimizer.init(params)
        for step in range(steps):
            set_adaptation_step(self.model, step)
            second_order = create_graph and (self.second_order_steps is None or step < self.second_order_steps)
            xs, ys = self.inner_batch(x, y, step)
            # A step that is not second order treats its gradient as a constant to the outer pass, also
            # with respect to whatever computed its inputs (ANIL's body, through the features).
            xs = xs if second_order else xs.detach()

            def support_loss(p: Params, xs: Tensor = xs, ys: Tensor = ys) -> Tensor:
                return self.objective.loss(forward_with(module, p, buffers, xs), ys)

            grads = self._gradients(support_loss, params, second_order)
            params, state = self.inner_update(params, grads, step, state)
            trajectory.append(params)
        set_adaptation_step(self.model, None)
        return trajectory

    def outer_loss(self, trajectory: list[Params], buffers: Params, query_x: Tensor,
                   query_y: Tensor) -> tuple[Tensor, Tensor]:
        """The outer objective of one task and the adapted model's query predictions: MAML's is the
        query loss after the last inner step. MAML++'s multi-step loss overrides this."""
        after = forward_with(self.model, trajectory[-1], buffers, query_x)
        return self.objective.loss(after, query_y), after

    def _gradients(self, loss_fn: Callable[[Params], Tensor], params: Params, create_graph: bool) -> Params:
        """Gradients of `loss_fn` at `params`; differentiable by the outer pass iff `create_graph`.

        Under vmap only torch.func.grad transforms correctly, and torch.compile traces it into one
        graph with the rest of the task. On the eager per-task path autograd.grad is about 4x faster for
        small models (less dispatch), so each path uses its own engine.
        """
        # First order: differentiate at a detached copy, so the gradient is a constant to the outer
        # pass (and costs no second-order graph) while the update still flows through the identity path.
        if self.vectorize or torch.compiler.is_compiling():
            return grad(loss_fn)(params if create_graph else detach_all(params))
        with torch.enable_grad():
            at = params if create_graph else {k: p.detach().requires_grad_() for k, p in params.items()}
            values = torch.autograd.grad(loss_fn(at), list(at.values()), create_graph=create_graph,
                                         allow_unused=True, materialize_grads=True)
        return dict(zip(at, values))

    def _adapted_outcome(
        self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
        query_y: Tensor, steps: int, create_graph: bool,
    ) -> tuple[Tensor, Tensor]:
        """One task's query loss after adaptation (differentiable) and its query score: the part of a
        training step that `torch.compile` compiles (see `use_compile`)."""
        if self._channels_last and support_x.dim() == 4:
            support_x = support_x.contiguous(memory_format=torch.channels_last)
            query_x = query_x.contiguous(memory_format=torch.channels_last)
        trajectory = self._inner_loop(params, buffers, support_x, support_y, steps, create_graph)
        loss, after = self.outer_loss(trajectory, buffers, query_x, query_y)
        return loss, self.objective.score(after.detach(), query_y)

    def _task_outcome(
        self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
        query_y: Tensor, *, steps: int, create_graph: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Query loss after adaptation (differentiable), then detached pre-loss, score, pre-score."""
        args = (params, buffers, support_x, support_y, query_x, query_y, steps, create_graph)
        # Training steps only: evaluation (no gradients) stays eager rather than compile a second graph.
        run = self._compiled if self._compiled is not None and torch.is_grad_enabled() else self._adapted_outcome
        loss, score = run(*args)
        if self.measure_pre_adaptation or not torch.is_grad_enabled():
            with torch.no_grad():
                set_adaptation_step(self.model, 0)
                before = forward_with(self.model, params, buffers, query_x)
                set_adaptation_step(self.model, None)
            loss_pre, score_pre = self.objective.loss(before, query_y), self.objective.score(before, query_y)
        else:
            loss_pre = score_pre = torch.full_like(loss.detach(), math.nan)
        return loss, loss_pre, score, score_pre

    def _batch_outcome(self, batch: TaskBatch, *, steps: int, create_graph: bool,
                       backward: bool = False) -> tuple[Tensor, ...]:
        """Per-task outcomes (see `_task_outcome`), stacked over the meta-batch.

        With `backward`, also accumulate the gradient of the mean loss into `.grad` and return detached
        values. On the per-task path each task is backpropagated as soon as its loss exists, so its
        graph is freed before the next task's is built: second-order memory is that of one task, not
        of the whole meta-batch (docs/performance.md), for the same gradient.
        """
        params, buffers = params_of(self.model), buffers_of(self.model)
        fn = partial(self._task_outcome, steps=steps, create_graph=create_graph)
        tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        if self.vectorize:
            stacked = vmap(fn, in_dims=(None, None, 0, 0, 0, 0))(params, buffers, *tensors)
            if backward:
                stacked[0].mean().backward()
                return tuple(value.detach() for value in stacked)
            return stacked
        per_task: list[tuple[Tensor, ...]] = []
        for task_tensors in zip(*tensors):
            outcome: tuple[Tensor, ...] = fn(params, buffers, *task_tensors)
            if backward:
                (outcome[0] / len(batch)).backward()
                outcome = tuple(value.detach() for value in outcome)
            per_task.append(outcome)
        return tuple(torch.stack(values) for values in zip(*per_task))

    def adapt(self, task: Task, *, create_graph: bool = False, steps: int | None = None) -> Params:
        if steps is None:
            steps = self.inner_steps if self.training else self.eval_inner_steps
        params, buffers = params_of(self.model), buffers_of(self.model)
        return self._inner_loop(params, buffers, task.support_x, task.support_y, steps, create_graph)[-1]

    def meta_train_step(self, batch: TaskBatch) -> StepResult:
        loss, loss_pre, score, score_pre = self._batch_outcome(
            batch, steps=self.inner_steps, create_graph=not self.first_order, backward=True
        )
        return StepResult(loss.mean().item(), loss_pre.mean().item(), score.mean().item(), score_pre.mean().item())

    def evaluate(self, batch: TaskBatch) -> TaskScores:
        with torch.no_grad():
            outcome = self._batch_outcome(batch, steps=self.eval_inner_steps, create_graph=False)
        loss, loss_pre, score, score_pre = (value.detach() for value in outcome)
        return TaskScores(loss, loss_pre, score, score_pre)
