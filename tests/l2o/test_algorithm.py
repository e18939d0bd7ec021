"""The learned optimizer in the runner (algorithm=l2o): truncated meta-training steps the trainer's
optimizer once per segment, evaluation repeats a plain unroll and does not depend on batching, and the
comparison tunes the baselines on other problems."""

from __future__ import annotations

import torch

from metalearn.algorithms.l2o import BASELINES, LearnedOptimizer
from metalearn.l2o.optimizer import LSTMOptimizer
from metalearn.l2o.problems import MLPClassifier, Quadratic
from metalearn.l2o.tasks import ProblemTasks
from metalearn.l2o.unroll import unroll
from metalearn.tasks import fixed_batches


def make(family: Quadratic | MLPClassifier | None = None, **kwargs: object) -> tuple[ProblemTasks, LearnedOptimizer]:
    torch.manual_seed(0)
    tasks = ProblemTasks(family or Quadratic(dim=4))
    algorithm = LearnedOptimizer(LSTMOptimizer(hidden=6), tasks.objective, **kwargs)  # type: ignore[arg-type]
    algorithm.setup(tasks)
    return tasks, algorithm


def test_one_optimizer_step_per_truncated_segment() -> None:
    tasks, algorithm = make(horizon=10, unroll_length=4)  # segments of 4, 4 and 2 steps
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in algorithm.parameters()]
    result, norm = algorithm.update(tasks.sample(3, "train", torch.Generator().manual_seed(0)), optimizer)
    assert all(state["step"] == 3 for state in optimizer.state.values())
    assert all(p.grad is None for p in algorithm.parameters())
    moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(algorithm.parameters(), before, strict=True)])
    assert norm == float(moved.norm()) > 0
    assert result.score_pre > 0 and result.score > 0 and result.meta_loss > 0  # losses of the optimizees


def test_evaluation_is_a_plain_unroll_and_independent_of_batching() -> None:
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    family = MLPClassifier(x, (x[:, 0] > 0).long(), hidden=4, batch_size=8)
    tasks, algorithm = make(family, horizon=6, tuning_problems=4)
    batch = next(fixed_batches(tasks, "test", 3, seed=2, batch_size=3))
    scores = algorithm.evaluate(batch)
    losses, _, _ = unroll(algorithm.rule, family, batch, batch.theta0, 6, create_graph=False)
    torch.testing.assert_close(scores.score, losses[-1])
    torch.testing.assert_close(scores.extra["mean_loss"], losses[1:].mean(0))
    for name, lr in algorithm.tuned_learning_rates().items():  # each baseline on the same problems
        baseline, _, _ = unroll(BASELINES[name](lr), family, batch, batch.theta0, 6, create_graph=False)
        torch.testing.assert_close(scores.extra[f"final_loss_{name.lower()}"], baseline[-1])
    alone = torch.cat([algorithm.evaluate(b).score for b in fixed_batches(tasks, "test", 3, seed=2, batch_size=1)])
    torch.testing.assert_close(alone, scores.score)  # each problem's minibatches come from its own seed


def test_comparison_tunes_every_baseline_and_runs_twice_the_horizon() -> None:
    tasks, algorithm = make(horizon=20, tuning_problems=16)
    curves = algorithm.compare(tasks, torch.Generator().manual_seed(3), problems=8)
    assert len(curves) == 1 + len(BASELINES)
    assert all(len(curve) == 41 for curve in curves.values())
    sgd = next(v for k, v in curves.items() if k.startswith("SGD"))
    assert sgd[-1] < sgd[0]  # a tuned SGD makes progress on quadratics
