"""Sinusoid task family: shapes, ranges, determinism, one function per task, validation, picture."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn.data.sinusoid import SinusoidTasks
from metalearn.tasks import Task


def test_shapes_and_ranges() -> None:
    tasks = SinusoidTasks(k_shot=5, k_query=7)
    batch = tasks.sample(3, "train", torch.Generator().manual_seed(0))
    assert batch.support_x.shape == batch.support_y.shape == (3, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (3, 7, 1)
    xs = torch.cat([batch.support_x, batch.query_x], dim=1)
    assert xs.min() >= -5 and xs.max() <= 5
    assert torch.cat([batch.support_y, batch.query_y], dim=1).abs().max() <= 5


def test_same_generator_state_gives_same_tasks() -> None:
    a = SinusoidTasks().sample(4, "train", torch.Generator().manual_seed(7))
    b = SinusoidTasks().sample(4, "train", torch.Generator().manual_seed(7))
    c = SinusoidTasks().sample(4, "train", torch.Generator().manual_seed(8))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(a.support_x, c.support_x)


def test_support_and_query_come_from_one_sinusoid() -> None:
    """Fitting A sin(x - phase) = a sin x + b cos x on the support set predicts the query set exactly."""
    batch = SinusoidTasks(amplitude=(1.0, 2.0)).sample(5, "train", torch.Generator().manual_seed(1))
    for task in batch:
        design = torch.cat([torch.sin(task.support_x), torch.cos(task.support_x)], dim=1).double()
        coef = torch.linalg.lstsq(design, task.support_y.double()).solution
        query = torch.cat([torch.sin(task.query_x), torch.cos(task.query_x)], dim=1).double() @ coef
        assert torch.allclose(query, task.query_y.double(), atol=1e-5)
        amplitude = coef.norm().item()
        assert 1.0 - 1e-4 <= amplitude <= 2.0 + 1e-4


def test_noise_is_added_when_asked() -> None:
    batch = SinusoidTasks(noise_std=0.5).sample(5, "train", torch.Generator().manual_seed(1))
    task = batch[0]
    design = torch.cat([torch.sin(task.support_x), torch.cos(task.support_x)], dim=1)
    residual = task.support_y - design @ torch.linalg.lstsq(design, task.support_y).solution
    assert residual.abs().max() > 0.05


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k_shot": 0}, "k_shot=0"), ({"k_query": -1}, "k_query=-1"), ({"amplitude": (5.0, 0.1)}, "amplitude="),
    ({"noise_std": -0.1}, "noise_std=-0.1"), ({"x_range": (1.0,)}, "x_range="),
])
def test_bad_arguments_name_themselves(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SinusoidTasks(**kwargs)


def test_illustration_shows_true_curve_support_and_predictions() -> None:
    tasks = SinusoidTasks()
    calls: list[Task] = []

    def predict(task: Task, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(task)
        return torch.zeros_like(x), torch.sin(x)

    figure = tasks.illustrate(predict, torch.Generator().manual_seed(0), n_tasks=3)
    assert len(calls) == 3 and len(figure.axes) == 3
    axis = figure.axes[0]
    assert [line.get_label() for line in axis.get_lines()] == ["true function", "before adaptation", "after adaptation"]
    assert len(axis.collections[0].get_offsets()) == tasks.k_shot
    assert math.isclose(max(axis.get_lines()[2].get_ydata()), 1.0, abs_tol=1e-3)
