"""Sinusoid regression (Finn et al., 2017, section 5.1): each task is y = A sin(x - phase)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor

from metalearn.checks import interval, non_negative_float, positive_int
from metalearn.objectives import Regression
from metalearn.tasks import Split, Task, TaskBatch

Predictor = Callable[[Task, Tensor], tuple[Tensor, Tensor]]


class SinusoidTasks:
    """Draws sinusoid regression tasks with `k_shot` support and `k_query` query points each.

    Args:
        k_shot: support points per task.
        k_query: query points per task.
        amplitude: range [low, high] of the uniform amplitude distribution.
        phase: range of the uniform phase distribution.
        x_range: range of the uniform input distribution.
        noise_std: standard deviation of Gaussian noise added to the targets (0 in the paper).
    """

    input_shape = (1,)
    output_size = 1

    def __init__(
        self,
        k_shot: int = 10,
        k_query: int = 10,
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
        noise_std: float = 0.0,
    ) -> None:
        self.k_shot = positive_int("k_shot", k_shot)
        self.k_query = positive_int("k_query", k_query)
        self.amplitude = interval("amplitude", amplitude)
        self.phase = interval("phase", phase)
        self.x_range = interval("x_range", x_range)
        self.noise_std = non_negative_float("noise_std", noise_std)
        self.objective = Regression()

    def _uniform(self, bounds: tuple[float, float], shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=generator)

    def _functions(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        amplitude = self._uniform(self.amplitude, (batch_size, 1, 1), generator)
        phase = self._uniform(self.phase, (batch_size, 1, 1), generator)
        return amplitude, phase

    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> TaskBatch:
        """Draw `batch_size` tasks. Every split has the same distribution; fixed evaluation sets
        differ from training tasks through their own seeds."""
        amplitude, phase = self._functions(batch_size, generator)
        return self._tasks(amplitude, phase, generator)

    def _tasks(self, amplitude: Tensor, phase: Tensor, generator: torch.Generator) -> TaskBatch:
        n = self.k_shot + self.k_query
        x = self._uniform(self.x_range, (amplitude.shape[0], n, 1), generator)
        y = amplitude * torch.sin(x - phase)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=generator)
        return TaskBatch(x[:, : self.k_shot], y[:, : self.k_shot], x[:, self.k_shot :], y[:, self.k_shot :])

    def illustrate(self, predict: Predictor, generator: torch.Generator, n_tasks: int = 4) -> Figure:
        """Plot a few tasks: true curve, support points, predictions before and after adaptation."""
        amplitude, phase = self._functions(n_tasks, generator)
        batch = self._tasks(amplitude, phase, generator)
        grid = torch.linspace(*self.x_range, 200).unsqueeze(-1)
        figure = Figure(figsize=(4 * n_tasks, 3.4), layout="constrained")
        axes = figure.subplots(1, n_tasks, sharey=True)
        for i, (ax, task) in enumerate(zip(axes, batch)):
            before, after = predict(task, grid)
            true = amplitude[i, 0] * torch.sin(grid - phase[i, 0])
            ax.plot(grid, true, color="black", label="true function")
            ax.plot(grid, before.cpu(), "--", color="tab:gray", label="before adaptation")
            ax.plot(grid, after.cpu(), color="tab:red", label="after adaptation")
            ax.scatter(task.support_x, task.support_y, color="tab:blue", zorder=3,
                       label=f"{self.k_shot} support points")
            ax.set_title(f"A={amplitude[i, 0, 0]:.2f}, phase={phase[i, 0, 0]:.2f}")
            ax.set_xlabel("x")
        axes[0].set_ylabel("y")
        axes[0].legend(loc="lower left", fontsize="small")
        return figure
