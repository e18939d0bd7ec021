"""Helpers shared by the algorithm tests: deterministic models and sinusoid tasks, plain-autograd
references, finite differences, gradient capture and comparison, and a short sinusoid training run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms.base import GradientLearner, StepResult, TaskScores
from metalearn.algorithms.functional import Params
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.images import ClassImages
from metalearn.data.omniglot import Omniglot
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.models.conv import Conv4
from metalearn.models.mlp import MLP
from metalearn.objectives import Classification
from metalearn.tasks import TaskBatch, TaskSampler

VECTORIZE = pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])


def make_mlp(
    seed: int, hidden_sizes: tuple[int, ...] = (40, 40), activation: str = "relu", dtype: torch.dtype = torch.float32
) -> MLP:
    """An MLP(1 -> 1) whose initialisation depends only on `seed` (the global RNG is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP(1, 1, hidden_sizes=hidden_sizes, activation=activation)
    return model.to(dtype)


def tiny_tanh_mlp(seed: int = 0) -> MLP:
    """A float64 MLP(1, 1, [3]) with tanh: smooth, ten parameters (body net.0: six, head net.2: four),
    cheap to finite-difference."""
    return make_mlp(seed, hidden_sizes=(3,), activation="tanh", dtype=torch.float64)


def sinusoid_batch(n_tasks: int, seed: int, dtype: torch.dtype = torch.float64, shots: int = 5) -> TaskBatch:
    """`n_tasks` sinusoid tasks with `shots` support and query points, drawn from their own generator
    and cast to `dtype` (the defaults suit finite differences)."""
    batch = SinusoidTasks(k_shot=shots, k_query=shots).sample(n_tasks, "train", torch.Generator().manual_seed(seed))
    return TaskBatch(*(t.to(dtype) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))


def mse_with(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(functional_call(model, params, (x,)), y)


def reference_first_order_grads(model: nn.Module, batch: TaskBatch, lr: float, steps: int) -> Params:
    """FOMAML by hand: inner gradients detached, the meta-gradient is the query-loss gradient taken
    with respect to the adapted parameters themselves, averaged over the batch."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for task in batch:
        params = {name: p.detach() for name, p in model.named_parameters()}
        for _ in range(steps):
            leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
            grads = torch.autograd.grad(mse_with(model, leaves, task.support_x, task.support_y), list(leaves.values()))
            params = {name: (p - lr * g).detach() for (name, p), g in zip(params.items(), grads)}
        adapted = {name: p.clone().requires_grad_() for name, p in params.items()}
        query_grads = torch.autograd.grad(mse_with(model, adapted, task.query_x, task.query_y), list(adapted.values()))
        for name, g in zip(adapted, query_grads):
            total[name] += g / len(batch)
    return total


def central_differences(
    tensors: nn.Module | Mapping[str, Tensor], objective: Callable[[], float], eps: float = 1e-6
) -> Params:
    """d objective / d tensor by central differences, one entry at a time, for a module's parameters
    or the named tensors given (edited in place and restored bitwise)."""
    named = tensors.named_parameters() if isinstance(tensors, nn.Module) else tensors.items()
    grads = {}
    with torch.no_grad():
        for name, t in named:
            flat, g = t.view(-1), torch.zeros(t.numel(), dtype=t.dtype)
            for i in range(t.numel()):
                original = flat[i].item()
                flat[i] = original + eps
                plus = objective()
                flat[i] = original - eps
                minus = objective()
                flat[i] = original  # a Python float holds a float64 exactly, so this restores bitwise
                g[i] = (plus - minus) / (2 * eps)
            grads[name] = g.view_as(t)
    return grads


def meta_grads(algorithm: GradientLearner[Any], batch: TaskBatch,
               of: nn.Module | None = None) -> tuple[Params, StepResult]:
    """Run one meta-training step from zeroed gradients; return copies of the grads of `of`'s
    parameters (default: the model's) and the step's result."""
    algorithm.zero_grad(set_to_none=True)
    result = algorithm.meta_train_step(batch)
    module = algorithm.model if of is None else of
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    algorithm.zero_grad(set_to_none=True)
    return grads, result


def snapshot(module: nn.Module) -> Params:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_dicts_close(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor], **tolerances: float) -> None:
    """Same names, and torch.testing.assert_close per name (the failure message names the tensor)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, n=name: f"{n}: {m}", **tolerances)


def sinusoid_run(
    algorithm: GradientLearner[Any],
    optimizer: torch.optim.Optimizer,
    steps: int,
    meta_batch_size: int = 10,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[float, float, float]:
    """Meta-train `algorithm` for `steps` meta-steps on sinusoid tasks, as the trainer does (set_progress,
    then the step, the optimizer and the scheduler), and score 100 held-out tasks before and after.

    Returns:
        (pre, post, untrained): the trained algorithm's mean held-out query MSE before and after
        adaptation, and the untrained algorithm's after adaptation.
    """
    sampler = SinusoidTasks()
    held_out = sampler.sample(100, "val", torch.Generator().manual_seed(123))
    algorithm.eval()
    untrained = algorithm.evaluate(held_out)
    algorithm.train()
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        algorithm.set_progress(step, steps)
        algorithm.meta_train_step(sampler.sample(meta_batch_size, "train", generator))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    algorithm.eval()
    trained = algorithm.evaluate(held_out)
    return trained.loss_pre.mean().item(), trained.loss.mean().item(), untrained.loss.mean().item()


def learning_run(algorithm: GradientLearner[Any], episodes: TaskSampler, draw: Callable[[torch.Generator], Any],
                 steps: int, lr: float) -> tuple[float, TaskScores, StepResult]:
    """The short learning run of the metric-based methods' Omniglot tests: the held-out accuracy of the
    untrained algorithm on 100 test episodes (seed 7), then `steps` Adam steps on the batches `draw`
    gives from a generator seeded 8, then the scores on the same held-out episodes.

    Returns:
        (untrained accuracy, scores after training, the last training step's result).
    """
    held_out = episodes.sample(100, "test", torch.Generator().manual_seed(7))
    algorithm.eval()
    untrained = algorithm.evaluate(held_out).score.mean().item()
    algorithm.train()
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(8)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        result = algorithm.meta_train_step(draw(generator))
        optimizer.step()
    algorithm.eval()
    return untrained, algorithm.evaluate(held_out), result


def omniglot_learning(make: Callable[[nn.Module], GradientLearner[Any]], root: Path, cache_dir: Path, *,
                      steps: int = 150, lr: float = 1e-3) -> tuple[float, TaskScores]:
    """The short Omniglot run of the metric-based methods' tests: `make(model)` on a Conv-4 embedding of
    16 filters (BatchNorm with running statistics, initialised from seed 0), set up on 5-way 1-shot
    episodes with 5 queries, then `learning_run` with meta-batches of 4 training episodes.

    Returns:
        (untrained accuracy, scores after training on the held-out test episodes).
    """
    episodes = Omniglot(str(root), n_way=5, k_shot=1, k_query=5, cache_dir=str(cache_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        algorithm = make(Conv4(1, None, 28, hidden=16, norm="batch_running"))
        algorithm.setup(episodes)
    untrained, scores, _ = learning_run(algorithm, episodes, lambda g: episodes.sample(4, "train", g), steps, lr)
    return untrained, scores


class Fixed:
    """A task sampler that always returns the same batch (for `setup` on synthetic features)."""

    objective = Classification()

    def __init__(self, batch: TaskBatch) -> None:
        self.batch = batch

    def sample(self, batch_size: int, split: str, generator: torch.Generator) -> TaskBatch:
        return self.batch


def tiny_episodes(k_shot: int = 1) -> EpisodeSampler:
    """Random 8x8 images of 10 classes (6 per class) in every split: 6-way training, 3-way evaluation."""
    g = torch.Generator().manual_seed(0)
    images = ClassImages(torch.randint(0, 256, (60, 1, 8, 8), generator=g, dtype=torch.uint8),
                         torch.arange(10).repeat_interleave(6), [f"c{i}" for i in range(10)])
    return EpisodeSampler({"train": images, "val": images, "test": images}, n_way=3, k_shot=k_shot, k_query=2,
                          train_n_way=6, train_k_shot=2, train_k_query=3)


def tiny_conv(norm: str, seed: int = 0) -> Conv4:
    """A two-block Conv-4 embedding (4 filters, 8x8 images -> 16 features), seeded without touching
    the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Conv4(1, None, 8, hidden=4, blocks=2, norm=norm)


def random_batch(seed: int, tasks: int, n_way: int, shots: int, queries: int,
                 shape: tuple[int, ...] = (3,)) -> TaskBatch:
    """float64 tasks of random inputs of `shape` (points, or images such as (1, 4, 4)) with labels
    0..n_way-1 in a shuffled order."""
    g = torch.Generator().manual_seed(seed)

    def labels(per_class: int) -> Tensor:
        return torch.stack([torch.arange(n_way).repeat(per_class)[torch.randperm(n_way * per_class, generator=g)]
                            for _ in range(tasks)])

    def inputs(per_class: int) -> Tensor:
        return torch.randn(tasks, n_way * per_class, *shape, generator=g, dtype=torch.float64)

    return TaskBatch(inputs(shots), labels(shots), inputs(queries), labels(queries))
