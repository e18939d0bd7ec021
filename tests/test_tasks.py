"""Task containers, fixed evaluation sets and the metric arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn.checkpoint import flatten_hparams
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.metrics import mean_ci95
from metalearn.stats import INTERVAL, recorded_ci95
from metalearn.tasks import TaskBatch, fixed_batches, fixed_tasks


def test_task_batch_iterates_and_moves() -> None:
    batch = SinusoidTasks().sample(3, "train", torch.Generator().manual_seed(0))
    tasks = list(batch)
    assert len(batch) == 3 and len(tasks) == 3
    assert torch.equal(tasks[1].query_y, batch.query_y[1])
    moved = batch.to("cpu")
    assert torch.equal(moved.support_x, batch.support_x)
    assert torch.equal(TaskBatch.cat([batch, batch]).support_x[3:], batch.support_x)


def test_task_batch_rejects_mismatched_fields() -> None:
    with pytest.raises(ValueError, match="disagree"):
        TaskBatch(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(3, 1), torch.zeros(2, 1))


def test_fixed_sets_do_not_depend_on_batch_size() -> None:
    tasks = SinusoidTasks()
    by_4 = TaskBatch.cat(list(fixed_batches(tasks, "val", 10, seed=1, batch_size=4)))
    by_10 = TaskBatch.cat(list(fixed_batches(tasks, "val", 10, seed=1, batch_size=10)))
    assert torch.equal(by_4.query_y, by_10.query_y)
    assert [len(b) for b in fixed_batches(tasks, "val", 10, seed=1, batch_size=4)] == [4, 4, 2]
    first = next(fixed_tasks(tasks, "val", 1, seed=2))
    assert not torch.equal(first.support_x, by_4.support_x[0])


def test_mean_ci95_matches_hand_computation() -> None:
    """Student's t quantile from a printed table: t(0.975; 3) = 3.182, t(0.975; 39) = 2.023."""
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, ci = mean_ci95(values)
    std = math.sqrt(sum((v - 2.5) ** 2 for v in (1, 2, 3, 4)) / 3)
    assert mean == 2.5 and math.isclose(ci, 3.182 * std / 2, rel_tol=1e-3)
    forty = torch.arange(40.0)
    assert math.isclose(mean_ci95(forty)[1], 2.023 * forty.std().item() / math.sqrt(40), rel_tol=1e-3)
    assert mean_ci95(torch.tensor([0.5])) == (0.5, 0.0)


def test_intervals_of_older_files_are_read_on_students_t() -> None:
    """A half-width stored with the normal 1.96 (files without "interval") is rescaled to what mean_ci95
    gives for the same values; one stored on t is left alone."""
    values = torch.arange(40.0)
    mean, t_half = mean_ci95(values)
    normal = 1.96 * values.std().item() / math.sqrt(40)
    assert math.isclose(recorded_ci95(normal, 40, None), t_half, rel_tol=1e-6)
    assert recorded_ci95(t_half, 40, INTERVAL) == t_half


def test_flatten_hparams() -> None:
    flat = flatten_hparams({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": "x"})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "d": "None", "e": "x"}
