"""Functional-parameter helpers: adapted weights are dicts of tensors, never mutated modules."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

Params = dict[str, Tensor]


def params_of(module: nn.Module) -> Params:
    """The module's parameters as a name -> tensor dict (the live tensors, so gradients reach them)."""
    return dict(module.named_parameters())


def buffers_of(module: nn.Module) -> Params:
    """The module's buffers (e.g. BatchNorm statistics) as a name -> tensor dict."""
    return dict(module.named_buffers())


def forward_with(module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Run `module` on `x` with `params` and `buffers` substituted for its own."""
    return functional_call(module, {**params, **buffers}, (x,))


LearningRate = float | Mapping[str, Tensor]


def sgd_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: LearningRate) -> Params:
    """One plain gradient step, `p - lr * g`, with a scalar or a per-parameter learning rate."""
    if isinstance(lr, Mapping):
        return {name: p - lr[name] * grads[name] for name, p in params.items()}
    return {name: p - lr * grads[name] for name, p in params.items()}


def detach_all(tensors: Mapping[str, Tensor]) -> Params:
    """Detached copies of the tensors (same storage, no graph)."""
    return {name: t.detach() for name, t in tensors.items()}


class InnerOptimizer(Protocol):
    """A functional optimizer for inner loops: pure functions of tensors, so that the outer pass can
    differentiate through its updates (and `torch.func.vmap` can batch them). The options of the
    `algorithm/inner_optimizer` config group build one: InnerSGD, InnerAdam, or a learned update rule
    (a module, which MAML wraps in InnerLearned)."""

    def init(self, params: Mapping[str, Tensor]) -> Any:
        """The optimizer state before the first step."""

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: LearningRate,
             state: Any) -> tuple[Params, Any]:
        """The updated parameters and state."""


class InnerSGD:
    """Plain gradient descent, `p - lr * g` (stateless)."""

    def init(self, params: Mapping[str, Tensor]) -> None:
        return None

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: LearningRate,
             state: None) -> tuple[Params, None]:
        return sgd_step(params, grads, lr), None


class InnerAdam:
    """Adam (Kingma and Ba, 2015) written with differentiable tensor operations.

    Args:
        betas: decay rates of the first and second moment estimates (Reptile uses beta1 = 0).
        eps: added to the root of the second moment.
    """

    def __init__(self, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={list(betas)!r}: must be two numbers in [0, 1)")
        if not eps > 0:
            raise ValueError(f"eps={eps!r}: must be positive")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)

    def init(self, params: Mapping[str, Tensor]) -> tuple[int, Params, Params]:
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        return 0, zeros, dict(zeros)

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: LearningRate,
             state: tuple[int, Params, Params]) -> tuple[Params, tuple[int, Params, Params]]:
        t, m, v = state
        t += 1
        b1, b2 = self.betas
        m = {name: b1 * m[name] + (1 - b1) * g for name, g in grads.items()}
        v = {name: b2 * v[name] + (1 - b2) * g * g for name, g in grads.items()}
        c1, c2 = 1 - b1**t, 1 - b2**t
        # sqrt has an infinite derivative at 0 (a zero gradient entry); the clamp keeps second order
        # finite and changes the value by at most 1e-15.
        direction = {name: (m[name] / c1) / (torch.sqrt((v[name] / c2).clamp_min(1e-30)) + self.eps) for name in grads}
        return sgd_step(params, direction, lr), (t, m, v)


class CarriedState:
    """`optimizer` with its state carried from one task's inner loop to the next, as the published Reptile
    code does: its Adam moments and step count are not among the weights it restores after each task, so
    a task's inner loop starts from the state the previous task's loop ended with.

    While `record` is true, every step keeps its new state (detached: nothing is differentiated across
    tasks) as the starting state of the next inner loop; while false, inner loops start from the kept
    state and leave it unchanged (the published evaluation restores it after each test task). Before
    anything is kept, an inner loop starts from `optimizer.init`. `state` is what a checkpoint saves.
    """

    def __init__(self, optimizer: InnerOptimizer) -> None:
        self.optimizer = optimizer
        self.state: Any = None
        self.record = False

    def init(self, params: Mapping[str, Tensor]) -> Any:
        return self.optimizer.init(params) if self.state is None else self.state

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: LearningRate,
             state: Any) -> tuple[Params, Any]:
        params, state = self.optimizer.step(params, grads, lr, state)
        if self.record:
            self.state = tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, state)
        return params, state


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not a POSIX system: no check
        return 2**62


def check_graph_fits(rule: nn.Module, coordinates: int, like: Tensor) -> None:
    """Raise ValueError, before allocating, if one inner step of a coordinate-wise LSTM over `coordinates`
    coordinates cannot keep its graph (about 11 values per hidden unit, layer and coordinate: gates,
    activations, cell and hidden states) in the memory available on `like`'s device."""
    hidden, layers = getattr(rule, "hidden", 0), getattr(rule, "layers", 0)
    needed = coordinates * layers * hidden * 11 * like.element_size()
    free = available_memory(like.device)
    if needed > free:
        raise ValueError(f"inner_optimizer: a learned {type(rule).__name__} over the model's {coordinates:,} "
                         f"parameters needs about {needed / 2**30:.1f} GiB per inner step for its graph and "
                         f"{free / 2**30:.1f} GiB are free; use a smaller model or a smaller optimizer")


class InnerLearned:
    """A learned update rule as the inner optimizer (e.g. metalearn.l2o.optimizer.LSTMOptimizer, the
    coordinate-wise LSTM of Andrychowicz et al., 2016): the gradients of all parameters, flattened into
    one vector of coordinates, go through the rule, and every parameter takes θ ← θ + update. The rule
    sets the step size itself (`lr` is not used); its state carries over between inner steps."""

    def __init__(self, rule: nn.Module) -> None:
        if not (callable(getattr(rule, "initial_state", None)) and callable(getattr(rule, "step_unfused", None))):
            raise ValueError(f"inner_optimizer: {type(rule).__name__} is not a learned update rule "
                             "(initial_state and step_unfused, as metalearn.l2o.optimizer.LSTMOptimizer has)")
        self.rule: Any = rule  # an nn.Module with the learned-rule methods checked above
        self._checked = False

    def init(self, params: Mapping[str, Tensor]) -> Any:
        first = next(iter(params.values()))
        coordinates = sum(p.numel() for p in params.values())
        if not self._checked:
            check_graph_fits(self.rule, coordinates, first)
            self._checked = True
        return self.rule.initial_state(coordinates, first.dtype)

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: LearningRate,
             state: Any) -> tuple[Params, Any]:
        flat = torch.cat([grads[name].reshape(-1) for name in params])
        update, state = self.rule.step_unfused(flat, state)
        parts = update.split([p.numel() for p in params.values()])
        return {name: p + part.view_as(p) for (name, p), part in zip(params.items(), parts, strict=True)}, state
