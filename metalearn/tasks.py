"""Tasks, batches of tasks, and the sampler protocol every task family implements."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from matplotlib.figure import Figure
from torch import Tensor

from metalearn.objectives import Objective

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    """One task: a support set to adapt on and a query set to score the adapted model on."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of tasks: the fields of `Task` with a leading task dimension."""

    # What a task is, for messages that pair learners with task families.
    kind: ClassVar[str] = "examples (episodes of a dataset)"

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        sizes = {getattr(self, f.name).shape[0] for f in fields(self)}
        if len(sizes) != 1:
            raise ValueError(f"TaskBatch fields disagree on the number of tasks: {sorted(sizes)}")

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __iter__(self) -> Iterator[Task]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> Task:
        return Task(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i])

    def to(self, device: torch.device | str) -> TaskBatch:
        """Return the batch on `device` (non-blocking copies where the source is pinned)."""
        return TaskBatch(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))

    @staticmethod
    def cat(batches: Sequence[TaskBatch]) -> TaskBatch:
        """Concatenate batches along the task dimension."""
        return TaskBatch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(TaskBatch)))


@dataclass(frozen=True)
class PairBatch:
    """Pairs of examples for verification training (Siamese networks): `x1[i]` and `x2[i]` are of the
    same class iff `same[i]` is 1.0 (float, as the binary cross-entropy target)."""

    x1: Tensor
    x2: Tensor
    same: Tensor

    def __len__(self) -> int:
        return self.x1.shape[0]

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))


@dataclass(frozen=True)
class LabeledBatch:
    """A plain minibatch of examples `x` with their class `y` among all classes of a split (for
    pre-training a classifier, as the fine-tuning baselines do)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> LabeledBatch:
        return LabeledBatch(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))


@runtime_checkable
class TaskSampler(Protocol):
    """A task distribution: draws meta-batches of tasks for a split from an explicit generator.

    A family whose tasks are not episodes of examples says what it draws with a class attribute
    `batch_type` (environments: metalearn.rl.tasks.EnvTaskBatch; optimizee problems:
    metalearn.l2o.problems.ProblemBatch); `batch_type_of` reads it, `TaskBatch` when it is absent.
    """

    objective: Objective

    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> TaskBatch:
        """Draw `batch_size` tasks of `split`, using only `generator` for randomness."""
        ...


def batch_type_of(tasks: object) -> type:
    """The type of the batches a task family (an instance or its class) draws: its `batch_type`, else `TaskBatch`."""
    batch_type = getattr(tasks, "batch_type", TaskBatch)
    return batch_type if isinstance(batch_type, type) else TaskBatch


def derived_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th member of a set seeded by `seed` (a fixed task, a task's rollout): the
    members' streams are independent of each other and of how the set is later split up."""
    return (seed * 1_000_003 + index) % 2**63


def probe(model: torch.nn.Module, tasks: TaskSampler) -> Tensor:
    """The model's outputs [n, ...] for the support images of one validation episode (the same one every
    time), computed in evaluation mode without gradients, every module's mode restored afterwards (so
    BatchNorm's running statistics are untouched). Used to check a model against the data and to size the
    meta-parameters that depend on its outputs."""
    episode = tasks.sample(1, "val", torch.Generator().manual_seed(0))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out: Tensor = model(episode.support_x[0])
            return out
    finally:
        for module, training in modes.items():
            module.train(training)


@runtime_checkable
class Illustrated(Protocol):
    """A task family that can draw what an algorithm learned (predictions before/after adaptation)."""

    def illustrate(
        self, predict: Callable[[Task, Tensor], tuple[Tensor, Tensor]], generator: torch.Generator
    ) -> Figure:
        """A figure of a few tasks drawn from `generator`; `predict(task, x)` gives (before, after)."""
        ...


def fixed_tasks(sampler: TaskSampler, split: Split, n_tasks: int, seed: int) -> Iterator[Task]:
    """Yield a fixed, reproducible set of tasks: task `i` is drawn from its own seed.

    Seeding each task separately makes the set independent of how it is later chunked into batches
    and lets it be regenerated on demand instead of held in memory.
    """
    generator = torch.Generator()
    for i in range(n_tasks):
        generator.manual_seed(derived_seed(seed, i))
        yield sampler.sample(1, split, generator)[0]


def stack_tasks(tasks: Sequence[Task]) -> TaskBatch:
    """Stack tasks of equal shapes into a batch."""
    return TaskBatch(*(torch.stack([getattr(t, f.name) for t in tasks]) for f in fields(Task)))


def fixed_batches(
    sampler: TaskSampler, split: Split, n_tasks: int, seed: int, batch_size: int
) -> Iterator[TaskBatch]:
    """The fixed task set of `fixed_tasks` (task `i` drawn from its own seed), in batches of at most
    `batch_size` tasks, of whatever batch type the sampler draws (it must have `cat`)."""
    generator = torch.Generator()
    chunk: list[TaskBatch] = []
    for i in range(n_tasks):
        generator.manual_seed(derived_seed(seed, i))
        chunk.append(sampler.sample(1, split, generator))
        if len(chunk) == batch_size or i == n_tasks - 1:
            yield type(chunk[0]).cat(chunk)
            chunk = []


def drawer(tasks: TaskSampler, method: str, what: str) -> Callable[..., Any]:
    """The task family's method `method` (e.g. `sample_pairs`) that draws a learner's training batches of
    `what` (pairs, labelled examples), or a ValueError saying that this family cannot draw them."""
    draw = getattr(tasks, method, None)
    if not callable(draw):
        raise ValueError(f"trains on {what} of examples of the training classes, which this task family "
                         f"({type(tasks).__name__}) cannot draw: it needs a dataset of classes (an image dataset)")
    return draw  # type: ignore[no-any-return]
