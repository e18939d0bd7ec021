"""Tests of MAML++: the MSL schedule against the reference code's numbers, equality with MAML when
every switch is off, meta-gradients (model and learned rates) against finite differences,
derivative-order annealing against first- and second-order references, resume-exactness,
per-step BatchNorm, side-effect freedom, evaluation beyond the trained steps, and learning."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from metalearn.algorithms.functional import Params
from metalearn.algorithms.maml import MAML
from metalearn.algorithms.mamlpp import MAMLPlusPlus, multi_step_loss_weights, rate_key
from metalearn.models.conv import Conv4
from metalearn.models.norm import PerStepBatchNorm2d
from metalearn.objectives import Classification, Regression
from metalearn.tasks import TaskBatch
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

# Every switch off: plain MAML.
PLAIN: dict[str, Any] = {"multi_step_loss_steps": 0, "first_order_steps": 0, "learn_inner_lr": False}


def set_rates(algorithm: MAMLPlusPlus, seed: int, low: float = 0.02, high: float = 0.08) -> None:
    """Give every learned rate its own value in [low, high), so that a mix-up of tensors or steps shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for rates in algorithm.inner_lrs.values():
            rates.copy_(low + (high - low) * torch.rand(rates.shape, generator=generator, dtype=rates.dtype))


def rates_of(algorithm: MAMLPlusPlus, steps: int) -> dict[str, list[Tensor]]:
    """Per parameter name, the rate of each of `steps` inner steps, written out as the docstring says:
    steps beyond the learned ones reuse the last rate."""
    last = algorithm.inner_steps - 1
    return {name: [algorithm.inner_lrs[rate_key(name)][min(i, last)] for i in range(steps)]
            for name, _ in algorithm.model.named_parameters()}


def reference_losses(model: nn.Module, batch: TaskBatch, rates: Mapping[str, Sequence[Tensor | float]],
                     weights: Sequence[float]) -> Tensor:
    """Per task, sum_i weights[i] * query MSE after i + 1 inner SGD steps with per-name, per-step rates,
    written with plain autograd and differentiable to second order."""
    losses = []
    with torch.enable_grad():
        for task in batch:
            params: Params = dict(model.named_parameters())
            total = torch.zeros((), dtype=task.query_y.dtype)
            for i, weight in enumerate(weights):
                grads = torch.autograd.grad(mse_with(model, params, task.support_x, task.support_y),
                                            list(params.values()), create_graph=True)
                params = {name: p - rates[name][i] * g for (name, p), g in zip(params.items(), grads)}
                total = total + weight * mse_with(model, params, task.query_x, task.query_y)
            losses.append(total)
    return torch.stack(losses)


# ---------------------------------------------------------------------------------------------
# (a) The multi-step loss schedule.
# ---------------------------------------------------------------------------------------------

# The reference code (get_per_step_loss_importance_vector) with N = 5 inner steps and 10 MSL epochs:
# decay = 1/5/10 = 0.02 per epoch; non-final weights 0.2 - 0.02 e (floor 0.03/5 = 0.006), final weight
# 0.2 + 4 * 0.02 e (cap 1 - 4 * 0.006 = 0.976). With 500 meta-steps per epoch, epoch e is meta-step 500 e.
REFERENCE_EPOCHS = {
    0: [0.2, 0.2, 0.2, 0.2, 0.2],
    1: [0.18, 0.18, 0.18, 0.18, 0.28],
    5: [0.1, 0.1, 0.1, 0.1, 0.6],
    9: [0.02, 0.02, 0.02, 0.02, 0.92],  # the reference's last MSL epoch
}


def test_msl_weights_follow_the_reference_schedule() -> None:
    """Uniform at step 0; the reference's epoch values at epoch boundaries; floor and cap at the end
    of the window; the final step alone from the window on."""
    for epoch, expected in REFERENCE_EPOCHS.items():
        assert multi_step_loss_weights(500 * epoch, 5000, 5) == pytest.approx(expected, abs=1e-12), epoch
    # Counted in meta-steps, the decay continues within the last epoch: from step 4850 (0.97 of the
    # window) non-final weights sit on the floor 0.006 and the final one on the cap 0.976.
    assert multi_step_loss_weights(4999, 5000, 5) == pytest.approx([0.006] * 4 + [0.976], abs=1e-12)
    assert multi_step_loss_weights(4850, 5000, 5) == pytest.approx([0.006] * 4 + [0.976], abs=1e-12)
    # Halfway through the reference's last MSL epoch (a fraction 0.95 of the window): 0.2 - 0.19 = 0.01.
    assert multi_step_loss_weights(4750, 5000, 5) == pytest.approx([0.01] * 4 + [0.96], abs=1e-12)
    for step in (5000, 5001, 100_000):
        assert multi_step_loss_weights(step, 5000, 5) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert multi_step_loss_weights(0, 0, 5) == [0.0, 0.0, 0.0, 0.0, 1.0]  # window 0: MSL off
    assert multi_step_loss_weights(3, 10, 1) == [1.0]


@pytest.mark.parametrize("inner_steps", [1, 2, 5, 8])
def test_msl_weights_sum_to_one(inner_steps: int) -> None:
    """At every step of the window (and after it) the weights sum to 1 up to rounding: what the
    non-final weights lose the final one gains, and floor and cap engage at the same step. The
    reference's vector is the same formula, so it too sums to 1 up to rounding (not bitwise)."""
    window = 1000
    for step in range(window + 2):
        weights = multi_step_loss_weights(step, window, inner_steps)
        assert len(weights) == inner_steps
        assert sum(weights) == pytest.approx(1.0, abs=1e-14), step
        assert all(w > 0 for w in weights) or step >= window


# ---------------------------------------------------------------------------------------------
# (b) With every switch off, MAML++ is MAML; LSLR rates at inner_lr change nothing but add parameters.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("learn_inner_lr", [False, True])
def test_equals_maml_with_switches_off(learn_inner_lr: bool, vectorize: bool) -> None:
    """MSL off, DA off, rates fixed (or learned but still at inner_lr): the adapted parameters, the
    meta-loss and the model's meta-gradients equal MAML's."""
    model = tiny_tanh_mlp(seed=3)
    batch = sinusoid_batch(3, seed=21)
    options: dict[str, Any] = {**PLAIN, "learn_inner_lr": learn_inner_lr}
    plus = MAMLPlusPlus(model, Regression(), inner_lr=0.05, inner_steps=2, vectorize=vectorize, **options)
    maml = MAML(model, Regression(), inner_lr=0.05, inner_steps=2, vectorize=vectorize)
    plus.set_progress(0, 100)

    for name, p in plus.adapt(batch[0]).items():
        torch.testing.assert_close(p, maml.adapt(batch[0])[name], rtol=1e-14, atol=0)
    plus_grads, plus_result = meta_grads(plus, batch)
    maml_grads, maml_result = meta_grads(maml, batch)

    assert plus_result.meta_loss == pytest.approx(maml_result.meta_loss, rel=1e-14)
    assert_dicts_close(plus_grads, maml_grads, rtol=1e-12, atol=1e-14)
    assert (len(list(plus.parameters())) - len(list(maml.parameters()))) == (4 if learn_inner_lr else 0)


# ---------------------------------------------------------------------------------------------
# (c) Meta-gradients of the model and the learned rates against finite differences.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
def test_meta_gradient_matches_finite_differences(vectorize: bool) -> None:
    """With MSL at a fixed point of its window (N = 2, step 3 of 10: weights 0.5 - 0.15 = 0.35 and
    0.5 + 0.15 = 0.65) and distinct learned rates, the grads of the model and of every rate equal
    central differences of the weighted outer loss, which is also the reported meta-loss."""
    model = tiny_tanh_mlp(seed=4)
    batch = sinusoid_batch(3, seed=22)
    algorithm = MAMLPlusPlus(model, Regression(), inner_lr=0.05, inner_steps=2, multi_step_loss_steps=10,
                             first_order_steps=0, vectorize=vectorize)
    set_rates(algorithm, seed=5)
    algorithm.set_progress(3, 100)
    assert algorithm.loss_weights(2) == pytest.approx([0.35, 0.65], abs=1e-15)

    def objective() -> float:
        return reference_losses(model, batch, rates_of(algorithm, 2), [0.35, 0.65]).mean().item()

    grads, result = meta_grads(algorithm, batch, of=algorithm)
    numeric = central_differences(algorithm, objective)

    assert result.meta_loss == pytest.approx(objective(), rel=1e-10)
    final_only = reference_losses(model, batch, rates_of(algorithm, 2), [0.0, 1.0]).mean().item()
    assert abs(result.meta_loss - final_only) > 1e-3 * final_only  # the weighting is really there
    assert {n for n in grads if n.startswith("inner_lrs.")} == {f"inner_lrs.{rate_key(n)}" for n, _ in
                                                                model.named_parameters()}
    assert_dicts_close(grads, numeric, rtol=1e-6, atol=1e-8)


# N = 3, window 100: (weights written out from the schedule: 1/3 - f/3 floored at 0.01, 1/3 + 2f/3
# capped at 0.98, for the fraction f = step / 100 of the window).
MSL_STAGES = [
    (0, [1 / 3, 1 / 3, 1 / 3]),
    (50, [1 / 6, 1 / 6, 2 / 3]),
    (99, [0.01, 0.01, 0.98]),  # 1/3 - 0.33 = 0.0033 is under the floor 0.01
    (100, [0.0, 0.0, 1.0]),
]


@pytest.mark.parametrize(("step", "weights"), MSL_STAGES, ids=[str(step) for step, _ in MSL_STAGES])
def test_meta_loss_is_the_weighted_sum_at_each_stage(step: int, weights: list[float]) -> None:
    """Through `meta_train_step`, the meta-loss at each stage of the window (uniform, halfway, on the
    floor, after it) is the weighted sum of the query losses after each of three inner steps."""
    model = tiny_tanh_mlp(seed=12)
    batch = sinusoid_batch(2, seed=27)
    algorithm = MAMLPlusPlus(model, Regression(), inner_lr=0.05, inner_steps=3, multi_step_loss_steps=100)
    set_rates(algorithm, seed=13)
    algorithm.set_progress(step, 1000)

    expected = reference_losses(model, batch, rates_of(algorithm, 3), weights).mean().item()
    assert meta_grads(algorithm, batch)[1].meta_loss == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# (d) Derivative-order annealing.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
def test_first_order_window_then_second_order(vectorize: bool) -> None:
    """first_order_steps=2: meta-steps 0 and 1 give the detached first-order reference's grads; from
    meta-step 2 on, MAML's second-order grads (tested against finite differences in test_maml).
    first_order=True stays first order after the window."""
    model = tiny_tanh_mlp(seed=6)
    batch = sinusoid_batch(3, seed=23)
    options: dict[str, Any] = {**PLAIN, "first_order_steps": 2}
    algorithm = MAMLPlusPlus(model, Regression(), inner_lr=0.05, inner_steps=2, vectorize=vectorize, **options)
    first_order = reference_first_order_grads(model, batch, 0.05, 2)
    second_order, _ = meta_grads(MAML(model, Regression(), inner_lr=0.05, inner_steps=2, vectorize=vectorize), batch)
    difference = max((first_order[n] - second_order[n]).abs().max().item() for n in first_order)
    assert difference > 1e-3  # the two references are distinguishable

    for step, expected in [(0, first_order), (1, first_order), (2, second_order), (50, second_order)]:
        algorithm.set_progress(step, 100)
        assert_dicts_close(meta_grads(algorithm, batch)[0], expected, rtol=1e-10, atol=1e-12)

    always = MAMLPlusPlus(model, Regression(), inner_lr=0.05, inner_steps=2, first_order=True,
                          vectorize=vectorize, **options)
    always.set_progress(50, 100)
    assert_dicts_close(meta_grads(always, batch)[0], first_order, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# (e) The schedule depends on set_progress alone.
# ---------------------------------------------------------------------------------------------


def test_schedule_is_determined_by_set_progress_alone() -> None:
    """An algorithm that has been through meta-steps 0..8 and is set back to step 4 gives the same
    loss and grads, bitwise, as a fresh one set to step 4; step 4 differs from step 0 (the MSL
    weights and the derivative order both change between them)."""
    batch = sinusoid_batch(3, seed=24)
    options: dict[str, Any] = {"inner_lr": 0.05, "inner_steps": 2, "multi_step_loss_steps": 6,
                               "first_order_steps": 3}
    travelled = MAMLPlusPlus(tiny_tanh_mlp(seed=7), Regression(), **options)
    for step in range(9):
        travelled.set_progress(step, 9)
        meta_grads(travelled, batch)
    travelled.set_progress(4, 9)
    fresh = MAMLPlusPlus(tiny_tanh_mlp(seed=7), Regression(), **options)
    fresh.set_progress(4, 9)

    travelled_grads, travelled_result = meta_grads(travelled, batch, of=travelled)
    fresh_grads, fresh_result = meta_grads(fresh, batch, of=fresh)
    assert travelled_result.meta_loss == fresh_result.meta_loss
    assert travelled_grads.keys() == fresh_grads.keys()
    assert all(torch.equal(travelled_grads[n], fresh_grads[n]) for n in fresh_grads)

    fresh.set_progress(0, 9)
    start_grads, start_result = meta_grads(fresh, batch, of=fresh)
    assert start_result.meta_loss != fresh_result.meta_loss
    assert not torch.equal(start_grads["model.net.0.weight"], fresh_grads["model.net.0.weight"])


# ---------------------------------------------------------------------------------------------
# Per-step BatchNorm weights (a model setting).
# ---------------------------------------------------------------------------------------------


def test_per_step_batch_norm_slots_are_used_and_learned() -> None:
    """With Conv4(norm=batch_per_step) and two inner steps, one meta-step fills finite grads for every
    parameter (rates included); each BatchNorm slot, the two per-step ones and the query one, gets a
    non-zero meta-gradient; and adaptation changes slot 0 and slot 1 (each step used its own) but not
    the query slot, which no support pass touches."""
    generator = torch.Generator().manual_seed(8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        model = Conv4(1, 3, 8, hidden=4, blocks=2, norm="batch_per_step", norm_steps=2)
    images = torch.randn(2, 12, 1, 8, 8, generator=generator)
    labels = torch.arange(3).repeat(4).expand(2, 12)
    batch = TaskBatch(images[:, :6], labels[:, :6], images[:, 6:], labels[:, 6:])
    algorithm = MAMLPlusPlus(model, Classification(), inner_lr=0.1, inner_steps=2, multi_step_loss_steps=10)

    algorithm.meta_train_step(batch)
    for name, p in algorithm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, PerStepBatchNorm2d)]
    assert len(norms) == 2
    for name, norm in norms:
        for tensor in (norm.weight, norm.bias):
            assert tensor.grad is not None
            assert (tensor.grad.abs().sum(dim=1) > 0).all(), f"{name}: a slot got no meta-gradient"

    adapted = algorithm.adapt(batch[0])
    for name, norm in norms:
        changed = (adapted[f"{name}.weight"] != norm.weight).any(dim=1)
        assert changed.tolist() == [True, True, False], name


# ---------------------------------------------------------------------------------------------
# (f) No side effects; evaluation beyond the trained steps.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
def test_adapt_and_evaluate_have_no_side_effects(vectorize: bool) -> None:
    """`adapt` leaves the model and the rates bitwise unchanged without .grad; `evaluate` creates no
    .grad on any parameter and returns tensors without a graph."""
    algorithm = MAMLPlusPlus(make_mlp(seed=9), Regression(), inner_lr=0.05, inner_steps=2, vectorize=vectorize)
    batch = sinusoid_batch(3, seed=25, dtype=torch.float32, shots=10)
    before = snapshot(algorithm)

    adapted = algorithm.adapt(batch[0], create_graph=True)
    scores = algorithm.evaluate(batch)

    for name, p in algorithm.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name
    assert all(not torch.equal(adapted[n], before[f"model.{n}"]) for n in adapted)
    assert all(not getattr(scores, f).requires_grad for f in ("loss", "loss_pre", "score", "score_pre"))


@VECTORIZE
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evaluation_steps_beyond_training_reuse_the_last_rate(mode: str, vectorize: bool) -> None:
    """inner_steps=2, eval_inner_steps=4: `evaluate` (in either module mode, inside the MSL window)
    reports the final query loss after 4 steps with rates r0, r1, r1, r1; so does eval-mode `adapt`."""
    model = tiny_tanh_mlp(seed=10)
    batch = sinusoid_batch(3, seed=26)
    algorithm = MAMLPlusPlus(model, Regression(), inner_lr=0.05, inner_steps=2, eval_inner_steps=4,
                             multi_step_loss_steps=10, vectorize=vectorize)
    set_rates(algorithm, seed=11)
    algorithm.set_progress(2, 100)
    algorithm.train(mode == "train")

    rates = {n: [r[0], r[1], r[1], r[1]] for n, r in rates_of(algorithm, 2).items()}
    expected = reference_losses(model, batch, rates, [0.0, 0.0, 0.0, 1.0]).detach()
    cycling = {n: [r[0], r[1], r[0], r[1]] for n, r in rates.items()}
    assert not torch.allclose(expected, reference_losses(model, batch, cycling, [0.0, 0.0, 0.0, 1.0]).detach())

    torch.testing.assert_close(algorithm.evaluate(batch).loss, expected, rtol=1e-12, atol=1e-14)
    algorithm.eval()
    adapted = algorithm.adapt(batch[1])
    torch.testing.assert_close(mse_with(model, adapted, batch[1].query_x, batch[1].query_y).detach(), expected[1])


def test_learned_rates_are_parameters_saved_with_the_algorithm() -> None:
    """LSLR: one rate per parameter tensor and inner step, initialised at inner_lr, in `parameters()`
    (so the meta-optimizer updates them) and in the state dict (so checkpoints restore them)."""
    model = make_mlp(seed=14, hidden_sizes=(3,))
    algorithm = MAMLPlusPlus(model, Regression(), inner_lr=0.1, inner_steps=3)
    names = [name for name, _ in model.named_parameters()]
    assert sorted(algorithm.inner_lrs) == sorted(rate_key(name) for name in names)
    assert all(torch.equal(rates, torch.full((3,), 0.1)) for rates in algorithm.inner_lrs.values())
    assert {id(r) for r in algorithm.inner_lrs.values()} <= {id(p) for p in algorithm.parameters()}

    set_rates(algorithm, seed=15)
    restored = MAMLPlusPlus(make_mlp(seed=16, hidden_sizes=(3,)), Regression(), inner_lr=0.1, inner_steps=3)
    restored.load_state_dict(algorithm.state_dict())
    for key in (f"inner_lrs.{rate_key(name)}" for name in names):
        assert torch.equal(restored.state_dict()[key], algorithm.state_dict()[key]), key
    step = restored.step_size(1)
    assert isinstance(step, dict)
    assert all(step[name] == algorithm.inner_lrs[rate_key(name)][1] for name in names)


# ---------------------------------------------------------------------------------------------
# (g) Learning happens.
# ---------------------------------------------------------------------------------------------


def test_short_sinusoid_run_learns_to_adapt_and_learns_rates() -> None:
    """300 meta-steps with every switch on (MSL for 150 steps, first order for 50) make two inner
    steps worth much more than before, and move the learned rates away from their initial value."""
    algorithm = MAMLPlusPlus(make_mlp(seed=0), Regression(), inner_lr=0.01, inner_steps=2,
                             multi_step_loss_steps=150, first_order_steps=50)
    pre, post, untrained = sinusoid_run(algorithm, torch.optim.Adam(algorithm.parameters(), lr=3e-3), steps=300)

    # Measured: untrained pre 4.47 / post 4.10; trained pre 3.63 / post 1.17.
    assert post < 0.6 * pre
    assert post < 0.6 * untrained
    moved = max((rates - 0.01).abs().max().item() for rates in algorithm.inner_lrs.values())
    assert moved > 1e-3


# ---------------------------------------------------------------------------------------------
# (h) Input validation.
# ---------------------------------------------------------------------------------------------


INVALID_ARGUMENTS: list[tuple[str, dict[str, Any]]] = [
    ("multi_step_loss_steps=-1", {"multi_step_loss_steps": -1}),
    ("multi_step_loss_steps=1.5", {"multi_step_loss_steps": 1.5}),
    ("multi_step_loss_steps=True", {"multi_step_loss_steps": True}),
    ("first_order_steps=-3", {"first_order_steps": -3}),
    ("first_order_steps=None", {"first_order_steps": None}),
    ("learn_inner_lr='yes'", {"learn_inner_lr": "yes"}),
    ("inner_lr=-1", {"inner_lr": -1}),
    ("inner_steps=0", {"inner_steps": 0}),
]


@pytest.mark.parametrize(
    ("message", "kwargs"),
    [pytest.param(message, kwargs, id=message) for message, kwargs in INVALID_ARGUMENTS],
)
def test_invalid_arguments_raise_value_error_naming_them(message: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        MAMLPlusPlus(nn.Linear(1, 1), Regression(), **kwargs)


def test_negative_progress_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"^step=-1: "):
        MAMLPlusPlus(nn.Linear(1, 1), Regression()).set_progress(-1, 10)
