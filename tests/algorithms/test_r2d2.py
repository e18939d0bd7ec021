"""R2-D2: the closed-form ridge solver against torch.linalg.lstsq in both of its forms, its gradient
against finite differences, the classifier by hand, and learning on a small problem."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from metalearn.algorithms.r2d2 import R2D2, ridge_regression
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.objectives import Classification
from metalearn.tasks import TaskBatch
from tests.algorithms.helpers import omniglot_learning


def lstsq_ridge(x: torch.Tensor, y: torch.Tensor, reg: float) -> torch.Tensor:
    """Ridge as least squares on the augmented system [x; sqrt(reg) I] W = [y; 0]."""
    d = x.shape[-1]
    a = torch.cat([x, math.sqrt(reg) * torch.eye(d, dtype=x.dtype)])
    b = torch.cat([y, torch.zeros(d, y.shape[-1], dtype=y.dtype)])
    return torch.linalg.lstsq(a, b).solution


@pytest.mark.parametrize(("n", "d"), [(5, 12), (12, 5), (6, 6)])
def test_ridge_solution_equals_least_squares_on_the_augmented_system(n: int, d: int) -> None:
    """Both forms (the Woodbury n x n system for n <= d, the d x d one otherwise) give the ridge solution."""
    g = torch.Generator().manual_seed(n * 10 + d)
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    for reg in (0.1, 2.0):
        torch.testing.assert_close(ridge_regression(x, y, reg), lstsq_ridge(x, y, reg), rtol=1e-10, atol=1e-10)
    batched = ridge_regression(torch.stack([x, 2 * x]), torch.stack([y, y]), 0.5)
    torch.testing.assert_close(batched[1], lstsq_ridge(2 * x, y, 0.5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("n", "d"), [(4, 7), (7, 4)])
def test_gradient_through_the_solver_matches_finite_differences(n: int, d: int) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    query = torch.randn(3, d, generator=g, dtype=torch.float64)
    log_reg = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r: query @ ridge_regression(x, y, r.exp()), (x, log_reg))


def test_classifier_by_hand() -> None:
    """Identity embedding, one-hot support features: W = Xᵀ(XXᵀ + λI)⁻¹Y = I / (1 + λ), so a query equal to
    a support example gets logit α / (1 + λ) + β for its class and β for the others."""
    algorithm = R2D2(nn.Identity(), Classification(), reg=0.5, scale=3.0, bias=0.25).double()
    support = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    labels = torch.tensor([[0, 1, 2]])
    query = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]], dtype=torch.float64)
    state = algorithm.fit(support, labels, 3)
    torch.testing.assert_close(state["weights"][0], torch.eye(3, dtype=torch.float64) / 1.5)
    expected = torch.tensor([[[0.25, 2.25, 0.25], [0.25, 0.25, 4.25]]], dtype=torch.float64)
    torch.testing.assert_close(algorithm.classify(state, query), expected)
    assert algorithm.reg.item() == pytest.approx(0.5)


def test_meta_parameters_and_their_gradients() -> None:
    """λ (as log λ) and α learn; β shifts every logit alike, so the cross-entropy gives it no gradient;
    `learn_reg=False` keeps λ a buffer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6))
    algorithm = R2D2(model, Classification()).double()
    names = {name for name, _ in algorithm.named_parameters()}
    assert {"log_reg", "scale", "bias"} <= names
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2]])
    batch = TaskBatch(torch.randn(1, 6, 4, generator=g, dtype=torch.float64), labels,
                      torch.randn(1, 6, 4, generator=g, dtype=torch.float64), labels)
    algorithm.meta_train_step(batch)
    assert algorithm.log_reg.grad is not None and algorithm.log_reg.grad.abs() > 0
    assert algorithm.scale.grad is not None and algorithm.scale.grad.abs() > 0
    assert algorithm.bias.grad is not None and algorithm.bias.grad.abs() < 1e-12
    fixed = R2D2(model, Classification(), learn_reg=False)
    assert "log_reg" not in {name for name, _ in fixed.named_parameters()} and "log_reg" in dict(fixed.named_buffers())


def test_learns_omniglot_5way_1shot(omniglot_root: Path, cache_dir: Path) -> None:
    """A Conv-4 with 16 filters, 150 meta-steps of 5-way 1-shot episodes (meta-batch 4, Adam 1e-3):
    held-out test-split accuracy is far above chance (20%) and well above the untrained network's."""
    untrained, scores = omniglot_learning(lambda model: R2D2(model, Classification()), omniglot_root, cache_dir)
    accuracy = scores.score.mean().item()
    assert accuracy > 0.7 and accuracy > untrained + 0.2, (untrained, accuracy)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="reg=0.0: must be a finite number > 0"):
        R2D2(nn.Identity(), Classification(), reg=0.0)
    with pytest.raises(ValueError, match="R2D2 needs a classification dataset"):
        R2D2(nn.Identity(), SinusoidTasks().objective)
