"""Pictures of what a meta-RL policy does, shared by the algorithms."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from torch import Tensor


def navigation_figure(goals: Tensor, paths: Sequence[Sequence[tuple[str, Tensor]]], title: str) -> Figure:
    """One panel per 2D-navigation goal (`goals` [n, 2]) with its labelled paths ([steps, 2] positions)."""
    figure = Figure(figsize=(3 * len(goals), 3.4))
    axes = figure.subplots(1, len(goals))
    for ax, goal, task_paths in zip(axes, goals, paths, strict=True):
        for label, path in task_paths:
            ax.plot(path[:, 0].numpy(), path[:, 1].numpy(), label=label, alpha=0.8)
        ax.plot([goal[0].item()], [goal[1].item()], "r*", markersize=12)
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
    axes[0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
