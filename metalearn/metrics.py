"""Metric names, TensorBoard tags and the TensorBoard writer. Every tag is built here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from metalearn.algorithms.base import StepResult, TaskScores
from metalearn.checkpoint import flatten_hparams
from metalearn.stats import t_quantile


def tag(split: str, name: str) -> str:
    """The TensorBoard tag of metric `name` on `split`: `{split}/{name}`."""
    return f"{split}/{name}"


def query_metric(metric: str) -> str:
    """Name of the post-adaptation query metric, e.g. `query_mse`."""
    return f"query_{metric}"


def step_metrics(result: StepResult, metric: str) -> dict[str, float]:
    """Training-step scalars: meta-loss and headline metric, before and after adaptation."""
    name = query_metric(metric)
    return {
        tag("train", "meta_loss"): result.meta_loss,
        tag("train", "meta_loss_pre"): result.meta_loss_pre,
        tag("train", name): result.score,
        tag("train", f"{name}_pre"): result.score_pre,
    }


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval of the mean, t * std / sqrt(n) with t Student's
    0.975 quantile for n - 1 degrees of freedom (2.023 at n = 40, 1.984 at 100, 1.964 at 600; the normal
    1.96 only in the limit); the half-width of a single value is 0."""
    values = values.double()
    n = values.numel()
    if n < 2:
        return values.mean().item(), 0.0
    return values.mean().item(), t_quantile(n) * values.std(unbiased=True).item() / math.sqrt(n)


def eval_metrics(scores: TaskScores, split: str, metric: str) -> dict[str, float]:
    """Evaluation scalars over a fixed task set: means with 95% CIs, before and after adaptation."""
    name = query_metric(metric)
    out: dict[str, float] = {}
    extra = tuple((query_metric(key), values) for key, values in scores.extra.items())
    for key, values in ((name, scores.score), (f"{name}_pre", scores.score_pre),
                        ("query_loss", scores.loss), ("query_loss_pre", scores.loss_pre), *extra):
        mean, ci = mean_ci95(values)
        out[tag(split, key)] = mean
        out[tag(split, f"{key}_ci95")] = ci
    out[tag(split, "tasks")] = float(scores.score.numel())
    return out


def lr_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current learning rate of each parameter group (`train/lr`, `train/lr_1`, ...)."""
    return {tag("train", "lr" if i == 0 else f"lr_{i}"): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


def speed_metrics(steps_per_sec: float, grad_norm: float) -> dict[str, float]:
    """Throughput and gradient norm of the meta-update."""
    return {tag("train", "steps_per_sec"): steps_per_sec, tag("train", "grad_norm"): grad_norm}


class TensorBoardLogger:
    """Scalars, figures and hyperparameters to TensorBoard event files in `log_dir`.

    Args:
        log_dir: directory of the event files (the run directory, so `tensorboard --logdir outputs`
            lists every run).
        flush_secs: how often pending events are written to disk.
        purge_step: on resume, events at or after this step from the interrupted run are hidden.
    """

    def __init__(self, log_dir: str | Path, flush_secs: int = 30, purge_step: int | None = None) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=flush_secs, purge_step=purge_step)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_figure(self, name: str, figure: Figure, step: int) -> None:
        self.writer.add_figure(name, figure, step, close=False)

    def start_hparams(self, config: Mapping[str, Any], metric_tags: list[str]) -> None:
        """Declare the run's hyperparameters and the scalar tags the HParams tab compares runs by."""
        experiment, session_start, _ = hparams(flatten_hparams(config), {name: 0.0 for name in metric_tags})
        # SummaryWriter.add_hparams would open a second run directory; write the summaries to this run.
        file_writer = self.writer._get_file_writer()
        file_writer.add_summary(experiment)
        file_writer.add_summary(session_start)

    def end_hparams(self) -> None:
        """Mark the run's HParams session as finished."""
        _, _, session_end = hparams({}, {})
        self.writer._get_file_writer().add_summary(session_end)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
