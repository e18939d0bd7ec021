"""Unrolled optimisation, the meta-loss, truncated BPTT and hand-designed baseline optimizers.

The meta-loss of Andrychowicz et al. (2016, Section 2) is L(φ) = E_f[Σ_t w_t f(θ_t)] over the
trajectory θ_{t+1} = θ_t + g_t, [g_t, h_{t+1}] = m(∇_t, h_t; φ), with w_t = 1. Following the paper
(Section 2, Figure 2) the optimizee's gradient ∇_t = ∇f(θ_t) is an *input* of the optimizer: the
second derivatives ∂∇_t/∂φ are dropped, so the meta-gradient flows only along θ_t → θ_{t+1} (the
identity), through the optimizer's hidden state and into f(θ_t) itself. `unroll` therefore takes ∇_t
from `torch.autograd.grad` without `create_graph`: a constant with no graph, and no Hessian-vector
products in the backward pass.

References:
    Andrychowicz et al. (2016). Learning to learn by gradient descent by gradient descent. NeurIPS.
    https://arxiv.org/abs/1606.04474
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from metalearn.l2o.optimizer import UpdateRule
from metalearn.l2o.problems import ProblemFamily

P = TypeVar("P")


def unroll(optimizer_fn: UpdateRule, problem_family: ProblemFamily[P], problem: P, theta0: Tensor, steps: int,
           state: Any = None, create_graph: bool = True, first_step: int = 0) -> tuple[Tensor, Tensor, Any]:
    """Run `steps` steps of `optimizer_fn` on a batch of problems, θ ← θ + update.

    The gradient fed to the optimizer is always detached (the paper drops the optimizee's second
    derivatives, see the module docstring). `create_graph` says whether the trajectory is differentiable
    with respect to the optimizer's parameters (meta-training) or not (evaluation, baselines).

    Args:
        optimizer_fn: the update rule (an `LSTMOptimizer` or a hand-designed baseline).
        problem_family: the family `problem` was sampled from.
        problem: a batch of B problems.
        theta0: the starting parameters [B, n].
        steps: optimisation steps.
        state: the optimizer's state (a fresh `initial_state(B·n)` if None).
        create_graph: keep the graph from the optimizer's parameters to the losses and final θ.
        first_step: the step index of θ_0 (for per-step minibatches when continuing a trajectory).

    Returns:
        The losses f(θ_0) … f(θ_steps) [steps + 1, B], θ_steps [B, n] and the optimizer's final state.
    """
    if state is None:
        state = optimizer_fn.initial_state(theta0.numel(), theta0.dtype)
    theta, losses = theta0, []
    for t in range(steps):
        with torch.enable_grad():
            if not theta.requires_grad:  # the start, or an evaluation: a leaf to take ∇f at
                theta = theta.detach().requires_grad_(True)
            loss = problem_family.loss(problem, theta, first_step + t)
            # No create_graph: ∇_t is a constant input of the optimizer (the paper's choice).
            (grad,) = torch.autograd.grad(loss.sum(), theta, retain_graph=create_graph)
        with torch.set_grad_enabled(create_graph):
            update, state = optimizer_fn(grad.reshape(-1), state)
            theta = theta + update.view_as(theta)
        losses.append(loss if create_graph else loss.detach())
        if not create_graph:
            theta = theta.detach()
    with torch.set_grad_enabled(create_graph):
        losses.append(problem_family.loss(problem, theta, first_step + steps))
    return torch.stack(losses), theta, state


def meta_loss(losses: Tensor) -> Tensor:
    """The paper's meta-loss Σ_{t≥1} w_t f(θ_t) with w_t = 1, averaged over the B problems and divided by
    the number of steps (a constant, so the direction of the meta-gradient is unchanged). f(θ_0) is left
    out: it does not depend on the optimizer.

    Args:
        losses: [steps + 1, B] from `unroll`.
    """
    return losses[1:].mean()


def detach_state(state: Any) -> Any:
    """The state with every tensor detached (tuples and lists are walked, anything else is kept)."""
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, tuple | list):
        return type(state)(detach_state(s) for s in state)
    return state


def meta_train_truncated(optimizer_fn: UpdateRule, problem_family: ProblemFamily[P], problem: P, steps: int,
                         unroll_length: int, step_fn: Callable[[Tensor], None], theta0: Tensor | None = None
                         ) -> Tensor:
    """Meta-train on one trajectory with truncated backpropagation through time (Section 3).

    The `steps`-step optimisation runs in segments of `unroll_length` steps. After each segment
    `step_fn(meta_loss)` backpropagates the segment's meta-loss and steps the meta-optimizer; θ and the
    optimizer state are then detached, so the next segment starts from where this one ended (with the
    updated optimizer) and no gradient crosses a segment boundary.

    Args:
        optimizer_fn: the learned optimizer.
        problem_family: the family `problem` was sampled from.
        problem: a batch of B problems.
        steps: the horizon T.
        unroll_length: steps per segment (20 in the paper).
        step_fn: backward pass and meta-optimizer step, given each segment's meta-loss.
        theta0: the start (the problems' `initial_params` by default).

    Returns:
        The detached losses f(θ_0) … f(θ_T), [T + 1, B].
    """
    if steps < 1 or unroll_length < 1:
        raise ValueError(f"steps={steps}, unroll_length={unroll_length}: both must be at least 1")
    theta = problem_family.initial_params(problem) if theta0 is None else theta0
    state, history = None, []
    for start in range(0, steps, unroll_length):
        losses, theta, state = unroll(optimizer_fn, problem_family, problem, theta, min(unroll_length, steps - start),
                                      state=state, create_graph=True, first_step=start)
        step_fn(meta_loss(losses))
        theta, state = theta.detach(), detach_state(state)
        # Each segment's first loss is the previous segment's last.
        history.append(losses.detach() if start == 0 else losses[1:].detach())
    return torch.cat(history)


class SGD:
    """Gradient descent, update = −lr ∇."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def initial_state(self, n_coordinates: int, dtype: torch.dtype | None = None) -> None:
        return None

    def __call__(self, grad: Tensor, state: None) -> tuple[Tensor, None]:
        return -self.lr * grad, None


class Momentum:
    """Gradient descent with heavy-ball momentum, as `torch.optim.SGD(momentum=...)`: b ← μ b + ∇,
    update = −lr b."""

    def __init__(self, lr: float, momentum: float = 0.9) -> None:
        self.lr = lr
        self.momentum = momentum

    def initial_state(self, n_coordinates: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.zeros(n_coordinates, dtype=dtype)

    def __call__(self, grad: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        buffer = self.momentum * state + grad
        return -self.lr * buffer, buffer


class RMSprop:
    """RMSprop (Tieleman and Hinton, 2012), as `torch.optim.RMSprop`: v ← α v + (1 − α) ∇²,
    update = −lr ∇ / (√v + ε)."""

    def __init__(self, lr: float, alpha: float = 0.99, eps: float = 1e-8) -> None:
        self.lr = lr
        self.alpha = alpha
        self.eps = eps

    def initial_state(self, n_coordinates: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.zeros(n_coordinates, dtype=dtype)

    def __call__(self, grad: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        square = self.alpha * state + (1 - self.alpha) * grad * grad
        return -self.lr * grad / (square.sqrt() + self.eps), square


class Adam:
    """Adam (Kingma and Ba, 2015), as `torch.optim.Adam`: bias-corrected moment estimates m̂, v̂,
    update = −lr m̂ / (√v̂ + ε)."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr = lr
        self.betas = betas
        self.eps = eps

    def initial_state(self, n_coordinates: int, dtype: torch.dtype | None = None) -> tuple[int, Tensor, Tensor]:
        zeros = torch.zeros(n_coordinates, dtype=dtype)
        return 0, zeros, zeros.clone()

    def __call__(self, grad: Tensor, state: tuple[int, Tensor, Tensor]) -> tuple[Tensor, tuple[int, Tensor, Tensor]]:
        step, m, v = state
        step += 1
        b1, b2 = self.betas
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        denominator = v.sqrt() / math.sqrt(1 - b2**step) + self.eps
        return -(self.lr / (1 - b1**step)) * m / denominator, (step, m, v)


def tune_learning_rate(problem_family: ProblemFamily[P], make_optimizer: Callable[[float], UpdateRule],
                       lrs: Sequence[float], steps: int, problems: P,
                       objective: Literal["final", "mean"] = "final") -> float:
    """The learning rate among `lrs` whose optimizer reaches the lowest mean loss on `problems`.

    Args:
        problem_family: the family `problems` was sampled from.
        make_optimizer: builds the optimizer for a learning rate (e.g. `SGD`).
        lrs: the candidates.
        steps: the horizon.
        problems: a batch of problems to tune on (not the ones reported).
        objective: the mean final loss f(θ_steps) or the mean loss over the whole trajectory.

    Returns:
        The best learning rate; a diverged run (a non-finite loss) is never chosen over a finite one.
    """
    if not lrs:
        raise ValueError("lrs is empty")
    theta0 = problem_family.initial_params(problems)
    scores = []
    for lr in lrs:
        losses, _, _ = unroll(make_optimizer(lr), problem_family, problems, theta0, steps, create_graph=False)
        score = float((losses[-1] if objective == "final" else losses).mean())
        scores.append(score if math.isfinite(score) else math.inf)
    return lrs[min(range(len(lrs)), key=scores.__getitem__)]
