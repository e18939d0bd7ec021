"""Functional-parameter helpers: adapted weights are dicts of tensors, never mutated modules."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import functional_call

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


def sgd_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: float | Mapping[str, Tensor]) -> Params:
    """One plain gradient step, `p - lr * g`, with a scalar or a per-parameter learning rate."""
    if isinstance(lr, Mapping):
        return {name: p - lr[name] * grads[name] for name, p in params.items()}
    return {name: p - lr * grads[name] for name, p in params.items()}


def detach_all(tensors: Mapping[str, Tensor]) -> Params:
    """Detached copies of the tensors (same storage, no graph)."""
    return {name: t.detach() for name, t in tensors.items()}
