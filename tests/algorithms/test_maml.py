"""Tests of MAML: hand-computed inner steps, meta-gradients against finite differences and
hand-built references, vmap/loop agreement, side-effect freedom, and learning on sinusoids."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.functional import InnerAdam, Params
from metalearn.algorithms.maml import MAML
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.objectives import Regression
from metalearn.tasks import Task, TaskBatch
from tests.algorithms.helpers import (
    VECTORIZE,
    assert_dicts_close,
    central_differences,
    make_mlp,
    meta_grads,
    mse_with,
    reference_first_order_grads,
    sinusoid_batch,
    sinusoid_run,
    snapshot,
    tiny_tanh_mlp,
)

# ---------------------------------------------------------------------------------------------
# Helpers: a MAML reference written with plain autograd (the shared ones are in helpers.py).
# ---------------------------------------------------------------------------------------------


def reference_adapt(model: nn.Module, params: Params, x: Tensor, y: Tensor, lr: float, steps: int) -> Params:
    """Plain SGD on (x, y) with torch.autograd.grad; no graph through the gradients."""
    for _ in range(steps):
        grads = torch.autograd.grad(mse_with(model, params, x, y), list(params.values()))
        params = {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
    return params


def reference_query_losses(model: nn.Module, batch: TaskBatch, lr: float, steps: int) -> Tensor:
    """Per-task query MSE after `steps` inner SGD steps from the model's current parameters."""
    losses = []
    with torch.enable_grad():
        for task in batch:
            params = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
            adapted = reference_adapt(model, params, task.support_x, task.support_y, lr, steps)
            losses.append(mse_with(model, adapted, task.query_x, task.query_y).detach())
    return torch.stack(losses)


# ---------------------------------------------------------------------------------------------
# 1. One (and two) inner steps computed by hand.
# ---------------------------------------------------------------------------------------------

# Linear model w*x + b, w = 0.5, b = 0.25, on x = [1, 2, 3], y = [2, 1, 0], lr = 0.1.
# Step 1: residuals r = w*x + b - y = [-1.25, 0.25, 1.75];
#   dL/dw = 2 mean(x r) = 2 * 4.5 / 3 = 3.0, dL/db = 2 mean(r) = 2 * 0.75 / 3 = 0.5
#   -> w = 0.5 - 0.1 * 3.0 = 0.2, b = 0.25 - 0.1 * 0.5 = 0.2.
# Step 2: r = [-1.6, -0.4, 0.8]; dL/dw = 2 * 0 / 3 = 0, dL/db = 2 * (-1.2) / 3 = -0.8
#   -> w = 0.2, b = 0.2 + 0.1 * 0.8 = 0.28.
HAND_STEPS = {1: (0.2, 0.2), 2: (0.2, 0.28)}


def linear_task() -> Task:
    x = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([[2.0], [1.0], [0.0]], dtype=torch.float64)
    return Task(x, y, x, y)


def linear_model() -> nn.Linear:
    model = nn.Linear(1, 1).double()
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.fill_(0.25)
    return model


@VECTORIZE
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("steps", sorted(HAND_STEPS))
def test_adapt_matches_hand_computed_sgd(steps: int, create_graph: bool, vectorize: bool) -> None:
    """`adapt` on linear regression gives w - lr * dL/dw (and b likewise), with dL/dw written out."""
    algorithm = MAML(linear_model(), Regression(), inner_lr=0.1, inner_steps=steps, vectorize=vectorize)
    adapted = algorithm.adapt(linear_task(), create_graph=create_graph)

    assert adapted.keys() == {"weight", "bias"}
    w, b = HAND_STEPS[steps]
    torch.testing.assert_close(adapted["weight"], torch.tensor([[w]], dtype=torch.float64))
    torch.testing.assert_close(adapted["bias"], torch.tensor([b], dtype=torch.float64))


@VECTORIZE
def test_adapt_matches_analytic_gradient_on_random_data(vectorize: bool) -> None:
    """One step on a bias-free linear model with random data equals w - lr * 2 mean(x (w x - y))."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(8, 1, generator=generator, dtype=torch.float64)
    y = torch.randn(8, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(-0.7)
    algorithm = MAML(model, Regression(), inner_lr=0.3, vectorize=vectorize)

    adapted = algorithm.adapt(Task(x, y, x, y))

    w = -0.7
    expected = w - 0.3 * 2 * (x * (w * x - y)).mean()
    torch.testing.assert_close(adapted["weight"], expected.reshape(1, 1))


# ---------------------------------------------------------------------------------------------
# 2. Second-order meta-gradient against finite differences.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(inner_steps: int, vectorize: bool) -> None:
    """`meta_train_step`'s grads equal central differences of the mean post-adaptation query loss,
    and its reported meta-loss (and `evaluate`'s) equal that objective."""
    model = tiny_tanh_mlp()
    batch = sinusoid_batch(3, seed=11)
    lr = 0.05
    algorithm = MAML(model, Regression(), inner_lr=lr, inner_steps=inner_steps, vectorize=vectorize)

    grads, result = meta_grads(algorithm, batch)
    objective = reference_query_losses(model, batch, lr, inner_steps).mean()
    numeric = central_differences(model, lambda: reference_query_losses(model, batch, lr, inner_steps).mean().item())

    assert result.meta_loss == pytest.approx(objective.item(), rel=1e-10)
    torch.testing.assert_close(algorithm.evaluate(batch).loss.mean(), objective)
    assert_dicts_close(grads, numeric, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# 3. First-order meta-gradient against a detached reference.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_first_order_meta_gradient_matches_detached_reference(inner_steps: int, vectorize: bool) -> None:
    """FOMAML's grads equal the query gradient at the adapted parameters with inner gradients
    detached, and differ clearly from the second-order grads."""
    model = tiny_tanh_mlp()
    batch = sinusoid_batch(3, seed=12)
    lr = 0.05
    first = MAML(model, Regression(), inner_lr=lr, inner_steps=inner_steps, first_order=True, vectorize=vectorize)
    second = MAML(model, Regression(), inner_lr=lr, inner_steps=inner_steps, first_order=False, vectorize=vectorize)

    first_grads, first_result = meta_grads(first, batch)
    second_grads, second_result = meta_grads(second, batch)

    assert_dicts_close(first_grads, reference_first_order_grads(model, batch, lr, inner_steps))
    # The forward pass is the same maths; only the backward pass differs.
    assert first_result.meta_loss == pytest.approx(second_result.meta_loss, rel=1e-12)
    difference = max((first_grads[n] - second_grads[n]).abs().max().item() for n in first_grads)
    scale = max(second_grads[n].abs().max().item() for n in second_grads)
    assert difference > 1e-2 * scale  # measured: 14% (one step) and 26% (two steps)


# ---------------------------------------------------------------------------------------------
# 4. The vmap path and the per-task loop agree.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_vmap_and_loop_paths_agree(first_order: bool, inner_steps: int) -> None:
    """On 5 sinusoid tasks, vectorize=True and vectorize=False give the same grads, StepResult and
    evaluation scores."""
    model = make_mlp(seed=3)
    batch = sinusoid_batch(5, seed=13, dtype=torch.float32, shots=10)
    vmapped, looped = (
        MAML(model, Regression(), inner_lr=0.01, inner_steps=inner_steps, first_order=first_order, vectorize=vectorize)
        for vectorize in (True, False)
    )

    vmap_grads, vmap_result = meta_grads(vmapped, batch)
    loop_grads, loop_result = meta_grads(looped, batch)

    assert vmap_grads.keys() == dict(model.named_parameters()).keys()
    assert_dicts_close(vmap_grads, loop_grads, rtol=1e-5, atol=1e-6)
    for field in ("meta_loss", "meta_loss_pre", "score", "score_pre"):
        assert getattr(vmap_result, field) == pytest.approx(getattr(loop_result, field), rel=1e-5), field
    vmap_scores, loop_scores = vmapped.evaluate(batch), looped.evaluate(batch)
    for field in ("loss", "loss_pre", "score", "score_pre"):
        torch.testing.assert_close(getattr(vmap_scores, field), getattr(loop_scores, field), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 5. No side effects: adapt leaves the model alone; evaluate leaves no gradients.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("create_graph", [False, True])
def test_adapt_leaves_model_unchanged(create_graph: bool, vectorize: bool) -> None:
    """`adapt` returns new tensors and leaves the model's parameters bitwise equal, with no .grad."""
    model = make_mlp(seed=4)
    algorithm = MAML(model, Regression(), inner_lr=0.1, inner_steps=2, vectorize=vectorize)
    task = sinusoid_batch(1, seed=14, dtype=torch.float32, shots=10)[0]
    before = snapshot(model)

    adapted = algorithm.adapt(task, create_graph=create_graph)

    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None, name
        assert not torch.equal(adapted[name], before[name]), f"{name} was not adapted"


@VECTORIZE
def test_evaluate_leaves_no_gradients(vectorize: bool) -> None:
    """`evaluate` creates no .grad (on a fresh model and after zero_grad(set_to_none=True)), keeps
    existing grads and parameters as they were, and returns per-task tensors without grad."""
    model = make_mlp(seed=5)
    algorithm = MAML(model, Regression(), inner_lr=0.01, vectorize=vectorize)
    batch = sinusoid_batch(4, seed=15, dtype=torch.float32, shots=10)
    params = list(algorithm.parameters())
    before = snapshot(model)

    scores = algorithm.evaluate(batch)
    assert all(p.grad is None for p in params)
    for field in ("loss", "loss_pre", "score", "score_pre"):
        value = getattr(scores, field)
        assert value.shape == (4,), field
        assert not value.requires_grad, field
        assert value.grad_fn is None, field

    algorithm.meta_train_step(batch)
    grads = [p.grad.clone() for p in params]
    algorithm.evaluate(batch)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads)), "evaluate changed existing grads"

    algorithm.zero_grad(set_to_none=True)
    algorithm.evaluate(batch)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# 6. eval_inner_steps.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
def test_eval_inner_steps_used_by_evaluate_and_eval_mode_adapt(vectorize: bool) -> None:
    """With inner_steps=1 and eval_inner_steps=3, `evaluate` adapts for 3 steps, training for 1,
    and `adapt` defaults to 3 steps in eval mode and 1 in training mode."""
    model = tiny_tanh_mlp(seed=1)
    batch = sinusoid_batch(4, seed=16)
    lr = 0.05
    algorithm = MAML(model, Regression(), inner_lr=lr, inner_steps=1, eval_inner_steps=3, vectorize=vectorize)
    three_steps = reference_query_losses(model, batch, lr, steps=3)
    one_step = reference_query_losses(model, batch, lr, steps=1)
    assert not torch.allclose(three_steps, one_step)

    scores = algorithm.evaluate(batch)
    torch.testing.assert_close(scores.loss, three_steps)
    for i, task in enumerate(batch):
        adapted = algorithm.adapt(task, steps=3)
        torch.testing.assert_close(mse_with(model, adapted, task.query_x, task.query_y).detach(), three_steps[i])

    task = batch[0]
    algorithm.eval()
    eval_adapted = algorithm.adapt(task)
    algorithm.train()
    train_adapted = algorithm.adapt(task)
    torch.testing.assert_close(mse_with(model, eval_adapted, task.query_x, task.query_y).detach(), three_steps[0])
    torch.testing.assert_close(mse_with(model, train_adapted, task.query_x, task.query_y).detach(), one_step[0])

    _, result = meta_grads(algorithm, batch)
    assert result.meta_loss == pytest.approx(one_step.mean().item(), rel=1e-10)


@VECTORIZE
def test_evaluate_pre_adaptation_fields(vectorize: bool) -> None:
    """`evaluate`'s loss_pre is the unadapted query MSE, and for regression score == loss."""
    model = tiny_tanh_mlp(seed=2)
    batch = sinusoid_batch(3, seed=17)
    algorithm = MAML(model, Regression(), inner_lr=0.05, vectorize=vectorize)

    scores = algorithm.evaluate(batch)

    with torch.no_grad():
        expected_pre = torch.stack([F.mse_loss(model(task.query_x), task.query_y) for task in batch])
    torch.testing.assert_close(scores.loss_pre, expected_pre)
    torch.testing.assert_close(scores.score_pre, scores.loss_pre)
    torch.testing.assert_close(scores.score, scores.loss)


# ---------------------------------------------------------------------------------------------
# 7. Learning happens.
# ---------------------------------------------------------------------------------------------


def test_short_sinusoid_run_learns_to_adapt() -> None:
    """500 meta-steps of MAML on sinusoids make one inner step worth much more than before: the
    post-adaptation MSE on held-out tasks falls well below the pre-adaptation MSE and far below
    the untrained model's post-adaptation MSE."""
    algorithm = MAML(make_mlp(seed=0), Regression(), inner_lr=0.01, inner_steps=1)
    pre, post, untrained = sinusoid_run(algorithm, torch.optim.Adam(algorithm.parameters(), lr=3e-3), steps=500)

    # Measured: untrained pre 4.47 / post 4.25; trained pre 3.45 / post 1.61.
    assert post < 0.6 * pre
    assert post < 0.6 * untrained


# ---------------------------------------------------------------------------------------------
# 8. Input validation.
# ---------------------------------------------------------------------------------------------


INVALID_ARGUMENTS: list[tuple[str, dict[str, Any]]] = [
    ("inner_lr=-1", {"inner_lr": -1}),
    ("inner_lr=nan", {"inner_lr": float("nan")}),
    ("inner_lr=inf", {"inner_lr": float("inf")}),
    ("inner_steps=0", {"inner_steps": 0}),
    ("inner_steps=1.5", {"inner_steps": 1.5}),
    ("inner_steps=True", {"inner_steps": True}),
    ("eval_inner_steps=-2", {"eval_inner_steps": -2}),
    ("eval_inner_steps=0", {"eval_inner_steps": 0}),
    ("inner_optimizer='adam': an object, not a name; in a config choose it with algorithm/inner_optimizer=adam",
     {"inner_optimizer": "adam"}),
    ("second_order_steps=0", {"second_order_steps": 0}),
]


@pytest.mark.parametrize(
    ("message", "kwargs"),
    [pytest.param(message, kwargs, id=message) for message, kwargs in INVALID_ARGUMENTS],
)
def test_invalid_arguments_raise_value_error_naming_them(message: str, kwargs: dict[str, Any]) -> None:
    """Invalid inner_lr / inner_steps / eval_inner_steps raise ValueError whose message names them."""
    with pytest.raises(ValueError, match=re.escape(message)):
        MAML(nn.Linear(1, 1), Regression(), **kwargs)


def test_invalid_inner_adam_settings_raise_value_error_naming_them() -> None:
    with pytest.raises(ValueError, match=re.escape("betas=[1.0, 0.999]: must be two numbers in [0, 1)")):
        InnerAdam(betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=re.escape("eps=0.0: must be positive")):
        InnerAdam(eps=0.0)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("first_order", [True, False])
def test_parameter_unused_by_the_loss_gets_zero_gradient(vectorize: bool, first_order: bool) -> None:
    """Both paths accept a parameter the loss never touches and give it a zero meta-gradient."""

    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(1, 1)
            self.unused = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    torch.manual_seed(0)
    model = WithUnused()
    algorithm = MAML(model, Regression(), inner_lr=0.1, first_order=first_order, vectorize=vectorize)
    algorithm.meta_train_step(SinusoidTasks().sample(3, "train", torch.Generator().manual_seed(0)))
    assert model.linear.weight.grad is not None and model.linear.weight.grad.abs().sum() > 0
    assert model.unused.grad is None or torch.equal(model.unused.grad, torch.zeros(3))


def test_vectorize_auto_follows_the_model() -> None:
    """auto: vmap for a dense model; the per-task loop for convolutions or BatchNorm running statistics;
    an explicit vmap request on running statistics is a clear error, not a crash inside vmap."""
    from metalearn.models.conv import Conv4

    dense = MAML(linear_model(), Regression())
    conv = MAML(Conv4(1, 5, 28, hidden=4, norm="batch"), Regression())
    running = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    assert dense.vectorize and not conv.vectorize and not MAML(running, Regression()).vectorize
    with pytest.raises(ValueError, match=r"^vectorize=True: .*\(1, .*running statistics"):
        MAML(running, Regression(), vectorize=True)
    with pytest.raises(ValueError, match=r"^vectorize='yes'"):
        MAML(linear_model(), Regression(), vectorize="yes")


# ---------------------------------------------------------------------------------------------
# 9. Inner optimizers and second order bounded to the first k inner steps.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
def test_inner_adam_matches_torch_adam(vectorize: bool) -> None:
    """Three inner Adam steps equal torch.optim.Adam's on the same support loss."""
    model = tiny_tanh_mlp()
    task = sinusoid_batch(1, seed=5)[0]
    algorithm = MAML(model, Regression(), inner_lr=0.03, inner_steps=3, inner_optimizer=InnerAdam(betas=(0.5, 0.9)),
                     vectorize=vectorize)
    adapted = algorithm.adapt(task)
    reference = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(reference.values(), lr=0.03, betas=(0.5, 0.9), eps=1e-8)
    for _ in range(3):
        optimizer.zero_grad()
        mse_with(model, reference, task.support_x, task.support_y).backward()
        optimizer.step()
    assert_dicts_close({n: p.detach() for n, p in adapted.items()}, {n: p.detach() for n, p in reference.items()},
                       rtol=1e-10, atol=1e-12)


@VECTORIZE
def test_second_order_through_inner_adam_matches_finite_differences(vectorize: bool) -> None:
    """The meta-gradient through two differentiable Adam steps equals central differences of the
    post-adaptation query loss (which the test above ties to torch's Adam)."""
    model = tiny_tanh_mlp()
    batch = sinusoid_batch(2, seed=6)
    algorithm = MAML(model, Regression(), inner_lr=0.02, inner_steps=2, inner_optimizer=InnerAdam(),
                     vectorize=vectorize)
    grads, result = meta_grads(algorithm, batch)
    numeric = central_differences(model, lambda: algorithm.evaluate(batch).loss.mean().item())
    assert result.meta_loss == pytest.approx(algorithm.evaluate(batch).loss.mean().item(), rel=1e-10)
    assert_dicts_close(grads, numeric, rtol=1e-5, atol=1e-8)


def reference_truncated_grads(model: nn.Module, batch: TaskBatch, lr: float, steps: int, k: int) -> Params:
    """Meta-gradient with the first `k` inner steps differentiated to second order and the later steps'
    gradients taken at detached parameters (constants to the outer pass)."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for task in batch:
        params = dict(model.named_parameters())
        for step in range(steps):
            if step < k:
                grads = torch.autograd.grad(mse_with(model, params, task.support_x, task.support_y),
                                            list(params.values()), create_graph=True)
            else:
                leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
                grads = torch.autograd.grad(mse_with(model, leaves, task.support_x, task.support_y),
                                            list(leaves.values()))
            params = {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
        query = torch.autograd.grad(mse_with(model, params, task.query_x, task.query_y), list(model.parameters()))
        for name, g in zip(total, query):
            total[name] += g / len(batch)
    return total


@VECTORIZE
@pytest.mark.parametrize("k", [1, 2, 3])
def test_second_order_steps_bounds_the_differentiated_steps(k: int, vectorize: bool) -> None:
    """second_order_steps=k differentiates the first k of 3 inner steps (k=3: all, i.e. plain MAML);
    the result lies strictly between first-order and full second-order MAML for k < 3."""
    model = tiny_tanh_mlp()
    batch = sinusoid_batch(3, seed=13)
    lr = 0.05
    bounded = MAML(model, Regression(), inner_lr=lr, inner_steps=3, second_order_steps=k, vectorize=vectorize)
    grads, _ = meta_grads(bounded, batch)
    assert_dicts_close(grads, reference_truncated_grads(model, batch, lr, 3, k), rtol=1e-8, atol=1e-10)
    full, _ = meta_grads(MAML(model, Regression(), inner_lr=lr, inner_steps=3, vectorize=vectorize), batch)
    first, _ = meta_grads(MAML(model, Regression(), inner_lr=lr, inner_steps=3, first_order=True,
                               vectorize=vectorize), batch)

    def distance(a: Params, b: Params) -> float:
        return max((a[n] - b[n]).abs().max().item() for n in a)

    if k == 3:
        assert distance(grads, full) < 1e-12
    else:
        assert distance(grads, full) > 1e-4 and distance(grads, first) > 1e-4


# ---------------------------------------------------------------------------------------------
# 10. BatchNorm: nothing leaks between tasks, or from query into support, unless the mode says so.
# ---------------------------------------------------------------------------------------------


def _image_batch(seed: int, tasks: int = 3) -> TaskBatch:
    """`tasks` 3-way 2-shot 2-query tasks of random float64 8x8 images."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(2).expand(tasks, -1).contiguous()
    return TaskBatch(torch.rand(tasks, 6, 1, 8, 8, generator=generator, dtype=torch.float64), labels,
                     torch.rand(tasks, 6, 1, 8, 8, generator=generator, dtype=torch.float64), labels)


def _tiny_conv(norm: str) -> nn.Module:
    from metalearn.models.conv import Conv4

    torch.manual_seed(0)
    return Conv4(1, 3, 8, hidden=4, blocks=2, norm=norm).double()


@pytest.mark.parametrize(("norm", "vectorize"), [("batch", True), ("batch", False), ("batch_per_step", False),
                                                 ("group", True)])
def test_no_batchnorm_leak_across_tasks_or_from_query_into_support(norm: str, vectorize: bool) -> None:
    """A task's adapted weights depend on its support set only, and its scores on nothing but itself:
    changing another task, or this task's query images, changes nothing else."""
    from metalearn.objectives import Classification

    algorithm = MAML(_tiny_conv(norm), Classification(), inner_lr=0.1, inner_steps=2, vectorize=vectorize)
    base, other = _image_batch(0), _image_batch(1)
    # Tasks 1 and 2 replaced: task 0's outcome is unchanged.
    mixed = TaskBatch(torch.cat([base.support_x[:1], other.support_x[1:]]), base.support_y,
                      torch.cat([base.query_x[:1], other.query_x[1:]]), base.query_y)
    torch.testing.assert_close(algorithm.evaluate(base).loss[0], algorithm.evaluate(mixed).loss[0], rtol=1e-12, atol=0)
    # Task 0's query images replaced: its adapted weights are unchanged.
    task = base[0]
    new_query = Task(task.support_x, task.support_y, other.query_x[0], task.query_y)
    first, second = algorithm.adapt(task), algorithm.adapt(new_query)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_running_statistics_are_untouched_by_evaluation() -> None:
    """batch_running: evaluation (eval mode) normalises with the running averages and updates none;
    training (train mode) updates them, as that mode says."""
    from metalearn.objectives import Classification

    model = _tiny_conv("batch_running")
    algorithm = MAML(model, Classification(), inner_lr=0.1)
    batch = _image_batch(0)
    before = {name: b.clone() for name, b in model.named_buffers()}
    algorithm.eval()
    algorithm.evaluate(batch)
    assert all(torch.equal(before[name], b) for name, b in model.named_buffers())
    algorithm.train()
    algorithm.meta_train_step(batch)
    assert any(not torch.equal(before[name], b) for name, b in model.named_buffers() if b.is_floating_point())


@VECTORIZE
def test_pre_adaptation_metrics_are_optional_and_change_nothing_else(vectorize: bool) -> None:
    """measure_pre_adaptation=False (the trainer's setting on steps it does not log) skips the query
    pass before adaptation: the pre metrics are NaN, the meta-gradient and the other metrics are the same."""
    model = tiny_tanh_mlp()
    batch = sinusoid_batch(3, seed=21)
    algorithm = MAML(model, Regression(), inner_lr=0.05, vectorize=vectorize)
    grads, result = meta_grads(algorithm, batch)
    algorithm.measure_pre_adaptation = False
    lean_grads, lean = meta_grads(algorithm, batch)
    assert math.isnan(lean.meta_loss_pre) and math.isnan(lean.score_pre)
    assert not math.isnan(result.meta_loss_pre)
    assert (lean.meta_loss, lean.score) == (result.meta_loss, result.score)
    assert_dicts_close(lean_grads, grads, rtol=0, atol=0)
    assert not algorithm.evaluate(batch).loss_pre.isnan().any()  # evaluation always measures them
