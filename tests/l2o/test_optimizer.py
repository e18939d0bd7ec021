"""The LSTM optimizer of Andrychowicz et al. (2016): the gradient preprocessing against hand values and
the coordinate-wise weight sharing (permuting the gradient's coordinates permutes the updates)."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn.l2o.optimizer import LSTMOptimizer, preprocess


def test_preprocess_by_hand() -> None:
    grad = torch.tensor([1.0, -math.exp(-5), 1e-6, -1e-6, 0.0], dtype=torch.float64)
    expected = torch.tensor([
        [0.0, 1.0],  # |∇| = 1 ≥ e^-10: (log 1 / 10, +1)
        [-0.5, -1.0],  # e^-5 ≥ e^-10: (−5 / 10, −1)
        [-1.0, math.exp(10) * 1e-6],  # 1e-6 < e^-10 ≈ 4.54e-5: (−1, e^10 · 1e-6 ≈ 0.0220)
        [-1.0, -math.exp(10) * 1e-6],
        [-1.0, 0.0],  # a zero gradient stays finite
    ], dtype=torch.float64)
    torch.testing.assert_close(preprocess(grad, p=10.0), expected)
    assert math.isclose(math.exp(10) * 1e-6, 0.0220265, rel_tol=1e-5)


def test_preprocess_is_continuous_at_the_cut_off_and_keeps_the_shape() -> None:
    p = 4.0
    edge = torch.tensor([math.exp(-p), -math.exp(-p)], dtype=torch.float64)
    # The first branch at |∇| = e^-p gives (−1, ±1), the second's limit e^p ∇ is ±1 as well.
    torch.testing.assert_close(preprocess(edge, p), torch.tensor([[-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(preprocess(edge * (1 - 1e-12), p), preprocess(edge, p))
    assert preprocess(torch.randn(3, 4, 5), p).shape == (3, 4, 5, 2)
    with pytest.raises(ValueError, match="preprocess_p=0"):
        preprocess(edge, 0)


def test_shapes_and_initial_state() -> None:
    opt = LSTMOptimizer(hidden=7, layers=3)
    h, c = opt.initial_state(11)
    assert h.shape == c.shape == (3, 11, 7) and not h.any() and not c.any()
    update, (h, c) = opt(torch.randn(11), (h, c))
    assert update.shape == (11,) and h.shape == c.shape == (3, 11, 7)
    assert opt.lstm.input_size == 2 and LSTMOptimizer(preprocess=False).lstm.input_size == 1
    # The same weights serve any number of coordinates.
    assert opt(torch.randn(4), opt.initial_state(4))[0].shape == (4,)
    with pytest.raises(ValueError, match="flat vector"):
        opt(torch.randn(2, 3), opt.initial_state(6))
    with pytest.raises(ValueError, match="float64"):
        opt(torch.randn(3, dtype=torch.float64), opt.initial_state(3))


@pytest.mark.parametrize("use_preprocess", [True, False])
def test_weights_are_shared_across_coordinates(use_preprocess: bool) -> None:
    torch.manual_seed(0)
    opt = LSTMOptimizer(hidden=5, preprocess=use_preprocess).double()
    grads = torch.randn(4, 9, dtype=torch.float64) * torch.logspace(-6, 1, 9, dtype=torch.float64)
    perm = torch.randperm(9)
    state, state_p = opt.initial_state(9), opt.initial_state(9)
    for grad in grads:  # the hidden state carries over: still a permutation after several steps
        update, state = opt(grad, state)
        update_p, state_p = opt(grad[perm], state_p)
        torch.testing.assert_close(update_p, update[perm])
        torch.testing.assert_close(state_p[0], state[0][:, perm])
    # Each coordinate alone gives the same update as inside the batch: nothing mixes coordinates.
    alone = torch.stack([opt(grads[0, i:i + 1], opt.initial_state(1))[0][0] for i in range(9)])
    torch.testing.assert_close(alone, opt(grads[0], opt.initial_state(9))[0])


def test_output_scale_multiplies_the_update() -> None:
    torch.manual_seed(0)
    small, large = LSTMOptimizer(output_scale=0.1), LSTMOptimizer(output_scale=0.3)
    large.load_state_dict(small.state_dict())
    grad = torch.randn(6)
    torch.testing.assert_close(large(grad, large.initial_state(6))[0], 3 * small(grad, small.initial_state(6))[0])


@pytest.mark.parametrize("use_preprocess", [True, False])
def test_unfused_step_is_the_fused_step_and_vmaps(use_preprocess: bool) -> None:
    torch.manual_seed(1)
    opt = LSTMOptimizer(hidden=5, layers=2, preprocess=use_preprocess).double()
    grads = torch.randn(3, 7, dtype=torch.float64)
    state = unfused = opt.initial_state(7)
    for grad in grads:  # several steps: the carried state agrees too
        update, state = opt(grad, state)
        update_unfused, unfused = opt.step_unfused(grad, unfused)
        torch.testing.assert_close(update_unfused, update)
        torch.testing.assert_close(unfused[1], state[1])
    # torch.func.vmap runs through it (the fused kernel has no batching rule): a row per problem.
    batched = torch.func.vmap(lambda g: opt.step_unfused(g, opt.initial_state(7))[0])(grads)
    torch.testing.assert_close(batched, torch.stack([opt(g, opt.initial_state(7))[0] for g in grads]))
