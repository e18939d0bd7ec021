"""ANIL (Almost No Inner Loop): MAML whose inner loop adapts only the network's head.

The body (every parameter outside the head) is learned in the outer loop alone; its meta-gradient
flows through the features into the query loss, and (second order) through the head's inner steps.
Since the body is fixed during adaptation, its features are computed once per task for the support
set and once for the query set, and the inner loop runs on the head only.

References:
    Raghu, A., Raghu, M., Bengio, S. and Vinyals, O. (2020). Rapid Learning or Feature Reuse? Towards
    Understanding the Effectiveness of MAML. ICLR. https://arxiv.org/abs/1909.09157
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.functional import Params, buffers_of, forward_with, params_of
from metalearn.algorithms.maml import MAML
from metalearn.models.norm import set_adaptation_step
from metalearn.objectives import Objective
from metalearn.tasks import Task


def find_head(model: nn.Module, head: str) -> str:
    """The name of the head submodule: `head` itself, or for "auto" the last submodule (in
    `named_modules()` order) that owns parameters directly. "" is the whole model."""
    if head == "auto":
        owners = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        if not owners:
            raise ValueError("head='auto': the model has no parameters")
        return owners[-1]
    modules = dict(model.named_modules())
    if head not in modules or not any(True for _ in modules[head].parameters()):
        raise ValueError(f"head={head!r}: must name a submodule of the model that has parameters "
                         f"(one of {[name for name, m in modules.items() if any(True for _ in m.parameters())]})")
    return head


class ANIL(MAML):
    """MAML with a head-only inner loop on features the body computes once per task.

    Per-step BatchNorm (`set_adaptation_step`) in the body: the support features are those of slot 0
    (the first inner step's) and serve every inner step, because the body does not change; the query
    features are those of the adapted model's query pass (slot None) and also serve the
    pre-adaptation query loss, so a body with per-step slots leaves slots 1.. unused. The head's own
    per-step layers, if any, follow MAML exactly.

    Args:
        model: the base model; its output must be the head's output, and the head must take one input.
        objective: the task family's loss and metric.
        head: name of the head submodule, e.g. "head" for Conv4 and ResNet12 or "net.4" for a
            two-hidden-layer MLP; "" is the whole model (then ANIL is MAML). "auto": the last submodule
            that owns parameters directly.
        **maml_args: MAML's other arguments (inner_lr, inner_steps, first_order, ...).
    """

    def __init__(self, model: nn.Module, objective: Objective, head: str = "auto", **maml_args: Any) -> None:
        super().__init__(model, objective, **maml_args)
        self.head_name = find_head(model, head)
        prefix = f"{self.head_name}." if self.head_name else ""
        # Inner-loop dicts use the head's local names (what functional_call on the head expects).
        self._full_names = {local: prefix + local for local, _ in self.head.named_parameters()}
        self._buffer_names = {local: prefix + local for local, _ in self.head.named_buffers()}

    @property
    def head(self) -> nn.Module:
        """The head submodule (looked up, not stored: an attribute would register it a second time
        and duplicate its parameters in `state_dict()`)."""
        return self.model.get_submodule(self.head_name)

    def _features(self, params: Params, buffers: Params, x: Tensor) -> Tensor:
        """The head's input when the model runs on `x` with `params`, caught by a forward pre-hook."""
        seen: list[tuple[Tensor, ...]] = []
        hooks = [self.head.register_forward_pre_hook(lambda _, args: seen.append(args)),
                 self.head.register_forward_hook(lambda _, __, out: seen.append((out,)))]
        try:
            output = forward_with(self.model, params, buffers, x)
        finally:
            for hook in hooks:
                hook.remove()
        # The cached features stand in for the model only if the head runs once, on one input, and
        # its output is the model's (anything applied after the head would be skipped).
        if len(seen) != 2 or len(seen[0]) != 1 or seen[1][0] is not output:
            raise ValueError(f"head={self.head_name!r}: the model's output must be the output of one call "
                             "of the head on one input")
        return seen[0][0]

    def _split(self, params: Params, buffers: Params) -> tuple[Params, Params]:
        """The head's parameters and buffers out of the model's, under the head's local names."""
        return ({local: params[full] for local, full in self._full_names.items()},
                {local: buffers[full] for local, full in self._buffer_names.items()})

    def _task_outcome(
        self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
        query_y: Tensor, *, steps: int, create_graph: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Query loss after adaptation (differentiable), then detached pre-loss, score, pre-score."""
        set_adaptation_step(self.model, 0)
        support = self._features(params, buffers, support_x)
        set_adaptation_step(self.model, None)
        query = self._features(params, buffers, query_x)
        head, head_buffers = self._split(params, buffers)
        with torch.no_grad():
            set_adaptation_step(self.model, 0)
            before = forward_with(self.head, head, head_buffers, query)
        trajectory = self._inner_loop(head, head_buffers, support, support_y, steps, create_graph, self.head)
        after = forward_with(self.head, trajectory[-1], head_buffers, query)
        return (
            self.objective.loss(after, query_y),
            self.objective.loss(before, query_y),
            self.objective.score(after.detach(), query_y),
            self.objective.score(before, query_y),
        )

    def use_compile(self, compile: bool | str, device: torch.device) -> bool:
        """No compiled path: ANIL's per-task work is a small head's inner loop on features computed once
        per task, and its `_task_outcome` replaces the one MAML compiles."""
        return MetaLearner.use_compile(self, compile, device)

    def adapt(self, task: Task, *, create_graph: bool = False, steps: int | None = None) -> Params:
        """The model's parameters with the head's replaced by their adapted values (usable with
        `forward_with(model, ...)`); the body's entries are the model's own tensors."""
        if steps is None:
            steps = self.inner_steps if self.training else self.eval_inner_steps
        params, buffers = params_of(self.model), buffers_of(self.model)
        set_adaptation_step(self.model, 0)
        support = self._features(params, buffers, task.support_x)
        head, head_buffers = self._split(params, buffers)
        adapted = self._inner_loop(head, head_buffers, support, task.support_y, steps, create_graph,
                                   self.head)[-1]
        return {**params, **{self._full_names[local]: p for local, p in adapted.items()}}
