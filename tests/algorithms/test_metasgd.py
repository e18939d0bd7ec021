"""Tests of Meta-SGD: constant rates reduce it to MAML, meta-gradients of the learned rates against
finite differences and a detached reference, checkpointing of the rates, side-effect freedom,
learning on sinusoids and argument checks."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import astuple
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from metalearn.algorithms.functional import InnerAdam, InnerSGD, Params
from metalearn.algorithms.maml import MAML
from metalearn.algorithms.metasgd import MetaSGD, lr_key
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.objectives import Regression
from metalearn.tasks import TaskBatch
from tests.algorithms.helpers import (
    VECTORIZE,
    assert_dicts_close,
    central_differences,
    make_mlp,
    mse_with,
    sinusoid_batch,
    sinusoid_run,
    snapshot,
    tiny_tanh_mlp,
)


def metasgd(model: nn.Module, seed: int = 0, **kwargs: Any) -> MetaSGD:
    """A MetaSGD whose random rates depend only on `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MetaSGD(model, Regression(), **kwargs)


def rates_of(algorithm: MetaSGD) -> Params:
    """The learned rates by parameter name."""
    return {name: algorithm.lrs[lr_key(name)] for name, _ in algorithm.model.named_parameters()}


def reference_query_losses(model: nn.Module, batch: TaskBatch, lrs: Mapping[str, Tensor], steps: int) -> Tensor:
    """Per-task query MSE after `steps` steps p - lr[p] * grad with plain autograd (no outer graph)."""
    losses = []
    with torch.enable_grad():
        for task in batch:
            params = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
            for _ in range(steps):
                grads = torch.autograd.grad(mse_with(model, params, task.support_x, task.support_y),
                                            list(params.values()))
                params = {name: p - lrs[name].detach() * g for (name, p), g in zip(params.items(), grads)}
            losses.append(mse_with(model, params, task.query_x, task.query_y).detach())
    return torch.stack(losses)


def grads_of(tensors: Mapping[str, Tensor]) -> Params:
    return {name: t.grad.clone() for name, t in tensors.items() if t.grad is not None}


# ---------------------------------------------------------------------------------------------
# 1. Constant, fixed rates: Meta-SGD is MAML.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("inner_optimizer", [InnerSGD, InnerAdam])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_constant_rates_equal_maml(inner_steps: int, inner_optimizer: type, vectorize: bool) -> None:
    """With every rate c, adapted params, meta-loss, evaluation and the model's second-order
    meta-gradients equal MAML(inner_lr=c)'s; the rates themselves receive a gradient."""
    model, c = tiny_tanh_mlp(), 0.05
    batch = sinusoid_batch(3, seed=21)
    common = dict(inner_steps=inner_steps, inner_optimizer=inner_optimizer(), vectorize=vectorize)
    meta_sgd = MetaSGD(model, Regression(), init_lr_range=[c, c], **common)
    maml = MAML(model, Regression(), inner_lr=c, **common)
    assert all(torch.equal(r, torch.full_like(r, c)) for r in rates_of(meta_sgd).values())

    assert_dicts_close(meta_sgd.adapt(batch[0]), maml.adapt(batch[0]))
    meta_sgd.zero_grad(set_to_none=True)
    result = meta_sgd.meta_train_step(batch)
    model_grads, rate_grads = grads_of(dict(model.named_parameters())), grads_of(rates_of(meta_sgd))
    meta_sgd.zero_grad(set_to_none=True)
    expected = maml.meta_train_step(batch)

    assert astuple(result) == pytest.approx(astuple(expected), rel=1e-12)
    assert_dicts_close(model_grads, grads_of(dict(model.named_parameters())))
    assert rate_grads.keys() == model_grads.keys() and all(g.abs().sum() > 0 for g in rate_grads.values())
    torch.testing.assert_close(meta_sgd.evaluate(batch).loss, maml.evaluate(batch).loss)


def test_null_range_starts_every_rate_at_inner_lr() -> None:
    algorithm = MetaSGD(tiny_tanh_mlp(), Regression(), init_lr_range=None, inner_lr=0.3)
    assert all(torch.equal(r, torch.full_like(r, 0.3)) for r in rates_of(algorithm).values())


def test_random_init_is_uniform_in_range_and_follows_the_global_seed() -> None:
    """Rates lie in [low, high], vary, have their parameter's shape and dtype, and repeat with the seed."""
    model = make_mlp(seed=0)
    first, again, other = metasgd(model, seed=1), metasgd(model, seed=1), metasgd(model, seed=2)
    rates = torch.cat([r.detach().flatten() for r in rates_of(first).values()])
    assert rates.min() >= 0.005 and rates.max() <= 0.1 and rates.std() > 0.02  # U[0.005, 0.1]: std 0.027
    for name, p in model.named_parameters():
        assert rates_of(first)[name].shape == p.shape and rates_of(first)[name].dtype == p.dtype
    assert_dicts_close(rates_of(first), rates_of(again), rtol=0, atol=0)
    assert not torch.equal(rates_of(first)["net.0.weight"], rates_of(other)["net.0.weight"])


# ---------------------------------------------------------------------------------------------
# 2. Meta-gradients of the rates (and the initialisation).
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(inner_steps: int, vectorize: bool) -> None:
    """Grads of the rates and of the model equal central differences of the mean query loss after
    per-parameter-rate steps; the reported meta-loss equals that objective."""
    model = tiny_tanh_mlp()
    batch = sinusoid_batch(3, seed=22)
    algorithm = metasgd(model, inner_steps=inner_steps, vectorize=vectorize)
    rates, params = rates_of(algorithm), dict(model.named_parameters())

    algorithm.zero_grad(set_to_none=True)
    result = algorithm.meta_train_step(batch)

    def objective() -> float:
        return reference_query_losses(model, batch, rates, inner_steps).mean().item()

    assert result.meta_loss == pytest.approx(objective(), rel=1e-10)
    assert_dicts_close(grads_of(rates), central_differences(rates, objective), rtol=1e-6, atol=1e-8)
    assert_dicts_close(grads_of(params), central_differences(params, objective), rtol=1e-6, atol=1e-8)


def reference_first_order_grads(model: nn.Module, batch: TaskBatch, lrs: Params, steps: int) -> tuple[Params, Params]:
    """First-order Meta-SGD by hand: each inner gradient is a constant, so the adapted params are
    p - sum_k lr * g_k with the g_k detached; grads of the mean query loss w.r.t. p and lr."""
    params = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
    rates = {name: r.detach().requires_grad_() for name, r in lrs.items()}
    total = torch.zeros((), dtype=torch.float64)
    for task in batch:
        adapted = params
        for _ in range(steps):
            at = {name: p.detach().requires_grad_() for name, p in adapted.items()}
            grads = torch.autograd.grad(mse_with(model, at, task.support_x, task.support_y), list(at.values()))
            adapted = {name: p - rates[name] * g for (name, p), g in zip(adapted.items(), grads)}
        total = total + mse_with(model, adapted, task.query_x, task.query_y) / len(batch)
    values = torch.autograd.grad(total, [*params.values(), *rates.values()])
    return dict(zip(params, values[: len(params)])), dict(zip(rates, values[len(params):]))


@VECTORIZE
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_first_order_meta_gradient_matches_detached_reference(inner_steps: int, vectorize: bool) -> None:
    model = tiny_tanh_mlp()
    batch = sinusoid_batch(3, seed=23)
    algorithm = metasgd(model, inner_steps=inner_steps, first_order=True, vectorize=vectorize)

    algorithm.zero_grad(set_to_none=True)
    algorithm.meta_train_step(batch)

    expected_params, expected_rates = reference_first_order_grads(model, batch, rates_of(algorithm), inner_steps)
    assert_dicts_close(grads_of(dict(model.named_parameters())), expected_params)
    assert_dicts_close(grads_of(rates_of(algorithm)), expected_rates)


# ---------------------------------------------------------------------------------------------
# 3. The rates are meta-parameters: optimizer, checkpoint.
# ---------------------------------------------------------------------------------------------


def test_rates_are_in_parameters_and_state_dict_and_round_trip() -> None:
    """Every model parameter has a rate under `lrs.` in state_dict; load_state_dict restores them into
    an algorithm with other rates; an optimizer step over algorithm.parameters() changes them."""
    model = make_mlp(seed=0)
    algorithm = metasgd(model, seed=1)
    state = algorithm.state_dict()
    assert {k for k in state if k.startswith("lrs.")} == {f"lrs.{lr_key(name)}" for name, _ in model.named_parameters()}
    assert {id(r) for r in algorithm.lrs.values()} <= {id(p) for p in algorithm.parameters()}

    restored = metasgd(make_mlp(seed=9), seed=2)
    assert not torch.equal(restored.lrs["net-0-weight"], algorithm.lrs["net-0-weight"])
    restored.load_state_dict(state)
    assert_dicts_close(rates_of(restored), rates_of(algorithm), rtol=0, atol=0)

    before = {name: r.detach().clone() for name, r in rates_of(algorithm).items()}
    optimizer = torch.optim.SGD(algorithm.parameters(), lr=0.1)
    algorithm.meta_train_step(SinusoidTasks().sample(4, "train", torch.Generator().manual_seed(0)))
    optimizer.step()
    assert all(not torch.equal(rates_of(algorithm)[name], before[name]) for name in before)


# ---------------------------------------------------------------------------------------------
# 4. No side effects.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("create_graph", [False, True])
def test_adapt_leaves_model_and_rates_unchanged(create_graph: bool, vectorize: bool) -> None:
    """`adapt` leaves parameters and rates bitwise equal and without .grad, and adapts by lr * grad."""
    model = tiny_tanh_mlp()
    algorithm = metasgd(model, vectorize=vectorize)
    task = sinusoid_batch(1, seed=24)[0]
    before = snapshot(algorithm)

    adapted = algorithm.adapt(task, create_graph=create_graph)

    for name, t in algorithm.named_parameters():
        assert torch.equal(t, before[name]) and t.grad is None, name
    params = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
    grads = torch.autograd.grad(mse_with(model, params, task.support_x, task.support_y), list(params.values()))
    expected = {name: p - rates_of(algorithm)[name] * g for (name, p), g in zip(params.items(), grads)}
    assert_dicts_close(adapted, expected)


@VECTORIZE
def test_evaluate_leaves_no_gradients(vectorize: bool) -> None:
    algorithm = metasgd(make_mlp(seed=5), vectorize=vectorize)
    batch = SinusoidTasks().sample(4, "train", torch.Generator().manual_seed(0))

    scores = algorithm.evaluate(batch)

    assert all(p.grad is None for p in algorithm.parameters())
    assert scores.loss.shape == (4,) and scores.loss.grad_fn is None


# ---------------------------------------------------------------------------------------------
# 5. Learning happens.
# ---------------------------------------------------------------------------------------------


def test_short_sinusoid_run_learns_to_adapt() -> None:
    """300 meta-steps (meta-batch 10, Adam 1e-3) make one learned-rate step worth much more: the
    post-adaptation MSE on held-out tasks falls well below the pre-adaptation MSE."""
    algorithm = metasgd(make_mlp(seed=0), seed=0)
    pre, post, untrained = sinusoid_run(algorithm, torch.optim.Adam(algorithm.parameters(), lr=1e-3), steps=300)

    # Measured: untrained pre 4.47 / post 4.26; trained pre 3.50 / post 1.73.
    assert post < 0.6 * pre
    assert post < 0.6 * untrained


# ---------------------------------------------------------------------------------------------
# 6. Argument checks.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [[0.1, 0.005], [0.1], [0.0, 0.1, 0.2], [-0.1, 0.1], [0.0, float("inf")],
                                   [float("nan"), 0.1], 0.1, "ab"])
def test_bad_init_range_raises_value_error_naming_it(value: Any) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(f"init_lr_range={value!r}: must be a pair")):
        MetaSGD(nn.Linear(1, 1), Regression(), init_lr_range=value)
