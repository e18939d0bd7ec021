"""Trust-region policy optimisation's update (Schulman et al., 2015): conjugate gradient on
Fisher-vector products, the step scaled to the KL constraint, and a backtracking line search."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10,
                       tolerance: float = 1e-10) -> Tensor:
    """An approximate solution x of A x = b for a symmetric positive-definite A given as `matvec`."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iterations):
        if rr < tolerance:
            break
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def assign_flat(params: Sequence[Tensor], vector: Tensor) -> None:
    """Write `vector` into `params` in place (no autograd history)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


@dataclass(frozen=True)
class TRPOStep:
    """What one update did: the surrogate before and after, the KL of the accepted step, the length of
    the accepted step (0 if the line search rejected every step) and the backtracking steps taken."""

    loss_before: float
    loss_after: float
    kl: float
    step_norm: float
    backtracks: int


def trpo_update(params: Sequence[Tensor], surrogate: Callable[[], Tensor], kl: Callable[[], Tensor],
                max_kl: float = 0.01, damping: float = 1e-5, cg_iterations: int = 10, backtrack: float = 0.8,
                line_search_steps: int = 15) -> TRPOStep:
    """Minimise `surrogate()` over `params` within KL `kl()` ≤ `max_kl`, in place.

    `surrogate` and `kl` recompute from the current values of `params` (with graphs, so that gradients
    and Fisher-vector products flow); at the current values `kl()` is 0. The natural-gradient
    direction solves F s = −g by conjugate gradient with F v = ∇(∇kl · v) + damping·v; the step is
    scaled so that ½ sᵀF s = max_kl, then halved by `backtrack` until the surrogate improves and the
    KL holds. If no step is accepted the parameters stay as they were.
    """
    params = list(params)
    loss = surrogate()
    gradient = flat(torch.autograd.grad(loss, params, retain_graph=False))
    divergence = kl()
    grad_kl = flat(torch.autograd.grad(divergence, params, create_graph=True))

    def fisher_vector(v: Tensor) -> Tensor:
        return flat(torch.autograd.grad(grad_kl @ v, params, retain_graph=True)) + damping * v

    direction = conjugate_gradient(fisher_vector, -gradient, cg_iterations)
    shs = 0.5 * direction @ fisher_vector(direction)
    before = float(loss.detach())
    old = flat([p.detach() for p in params]).clone()
    if not (torch.isfinite(shs) and shs > 0):
        return TRPOStep(before, before, 0.0, 0.0, 0)
    full_step = direction * torch.sqrt(max_kl / shs)
    fraction = 1.0
    for k in range(line_search_steps):
        assign_flat(params, old + fraction * full_step)
        new_loss, new_kl = float(surrogate().detach()), float(kl().detach())
        if new_loss < before and new_kl <= max_kl:
            return TRPOStep(before, new_loss, new_kl, float((fraction * full_step).norm()), k)
        fraction *= backtrack
    assign_flat(params, old)
    return TRPOStep(before, before, 0.0, 0.0, line_search_steps)
