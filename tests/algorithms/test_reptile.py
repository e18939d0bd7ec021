"""Tests of Reptile: the pseudo-gradient against the closed form on a quadratic loss, batched equals
the mean of serial, inner Adam against torch.optim.Adam, minibatch schedules, side-effect freedom,
learning on sinusoids, argument checks, and the linear outer step-size schedule."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from metalearn.algorithms.functional import InnerAdam, InnerSGD, Params
from metalearn.algorithms.reptile import EVAL_SEED, Reptile, minibatch_indices
from metalearn.checkpoint import load_checkpoint
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.models.mlp import MLP
from metalearn.objectives import Regression
from metalearn.run import train
from metalearn.tasks import Task, TaskBatch, stack_tasks
from tests.algorithms.helpers import (
    VECTORIZE,
    assert_dicts_close,
    make_mlp,
    meta_grads,
    mse_with,
    sinusoid_batch,
    sinusoid_run,
    snapshot,
    tiny_tanh_mlp,
)
from tests.conftest import Composer

# ---------------------------------------------------------------------------------------------
# Helpers (the shared ones are in helpers.py).
# ---------------------------------------------------------------------------------------------


def pseudo_gradient(algorithm: Reptile, batch: TaskBatch, step: int = 0) -> Params:
    """The `.grad` one meta-training step at meta-step `step` writes, from zeroed gradients."""
    algorithm.set_progress(step, 100)
    return meta_grads(algorithm, batch)[0]


# ---------------------------------------------------------------------------------------------
# 1. The pseudo-gradient on a quadratic loss equals the closed form.
# ---------------------------------------------------------------------------------------------


def least_squares_task(seed: int, n: int = 8, d: int = 3) -> Task:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    return Task(x, y, x, y)


def closed_form_pseudo_gradient(task: Task, w0: Tensor, lr: float, k: int) -> Tensor:
    """MSE of a bias-free linear model is 0.5 (w - c)^T A (w - c) + const with A = 2/n X^T X and c
    the least-squares solution, so k SGD steps give phi = c + (I - lr A)^k (w0 - c) and
    theta - phi = (I - (I - lr A)^k) (w0 - c)."""
    x, y = task.support_x, task.support_y
    a = 2 / x.shape[0] * x.T @ x
    c = torch.linalg.lstsq(x, y).solution.view(-1)
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return (eye - torch.linalg.matrix_power(eye - lr * a, k)) @ (w0 - c)


@VECTORIZE
@pytest.mark.parametrize("n_tasks", [1, 3], ids=["serial", "batched"])
def test_pseudo_gradient_matches_closed_form_on_quadratic(n_tasks: int, vectorize: bool) -> None:
    """k inner SGD steps on least squares: `.grad` = mean over tasks of (I - (I - lr A)^k)(w0 - c)."""
    lr, k = 0.1, 4
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64))
    tasks = [least_squares_task(seed) for seed in range(n_tasks)]
    algorithm = Reptile(model, Regression(), inner_lr=lr, inner_steps=k, inner_optimizer=InnerSGD(),
                        vectorize=vectorize)

    grads = pseudo_gradient(algorithm, stack_tasks(tasks))

    w0 = model.weight.detach().view(-1)
    expected = torch.stack([closed_form_pseudo_gradient(task, w0, lr, k) for task in tasks]).mean(0)
    assert grads.keys() == {"weight"}
    torch.testing.assert_close(grads["weight"].view(-1), expected, rtol=0, atol=1e-10)
    assert expected.abs().min() > 1e-2  # a real update, not a trivially zero one


@VECTORIZE
@pytest.mark.parametrize("inner_batch_size", [None, 4])
def test_serial_pseudo_gradient_is_theta_minus_phi(inner_batch_size: int | None, vectorize: bool) -> None:
    """With one task, `.grad` is theta - adapt(task) (bit for bit on the per-task path) and the
    reported meta-loss is the adapted model's query loss."""
    model = tiny_tanh_mlp()
    batch = sinusoid_batch(1, seed=3, shots=6)
    algorithm = Reptile(model, Regression(), inner_state="task",
                        inner_lr=0.05, inner_steps=3, inner_batch_size=inner_batch_size,
                        vectorize=vectorize)
    theta = snapshot(model)

    algorithm.set_progress(7, 100)
    result = algorithm.meta_train_step(batch)
    phi = algorithm.adapt(batch[0])

    tolerance = {"rtol": 1e-12, "atol": 1e-14} if vectorize else {"rtol": 0.0, "atol": 0.0}
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()},
                       {n: theta[n] - phi[n].detach() for n in theta}, **tolerance)
    query_loss = mse_with(model, phi, batch.query_x[0], batch.query_y[0]).item()
    assert result.meta_loss == pytest.approx(query_loss, rel=1e-12)
    with torch.no_grad():
        assert result.meta_loss_pre == pytest.approx(F.mse_loss(model(batch.query_x[0]), batch.query_y[0]).item())


# ---------------------------------------------------------------------------------------------
# 2. Batched Reptile is the mean of serial Reptile; vmap and loop agree.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("inner_optimizer", [InnerSGD, InnerAdam])
def test_batched_pseudo_gradient_is_mean_of_serial(inner_optimizer: type, vectorize: bool) -> None:
    """The meta-batch's `.grad` equals the mean of the one-task `.grad`s at the same meta-step
    (the tasks share that step's minibatches)."""
    model = tiny_tanh_mlp(seed=1)
    batch = sinusoid_batch(4, seed=4, shots=6)
    algorithm = Reptile(model, Regression(), inner_state="task",
                        inner_lr=0.02, inner_steps=5, inner_optimizer=inner_optimizer(),
                        inner_batch_size=4, vectorize=vectorize)

    batched = pseudo_gradient(algorithm, batch, step=11)
    serial = [pseudo_gradient(algorithm, stack_tasks([task]), step=11) for task in batch]

    assert_dicts_close(batched, {n: torch.stack([g[n] for g in serial]).mean(0) for n in batched},
                       rtol=1e-10, atol=1e-13)
    spread = max((serial[0][n] - serial[1][n]).abs().max().item() for n in batched)
    assert spread > 1e-3  # the tasks pull in different directions, so the mean is a real test


@pytest.mark.parametrize("inner_batch_size", [None, 4])
def test_vmap_and_loop_paths_agree(inner_batch_size: int | None) -> None:
    """vectorize=True and False give the same `.grad`, StepResult and evaluation scores."""
    batch = sinusoid_batch(5, seed=5, dtype=torch.float32, shots=8)
    model = MLP(1, 1, hidden_sizes=(16, 16))
    vmapped, looped = (Reptile(model, Regression(), inner_state="task",
                               inner_lr=0.01, inner_steps=4, eval_inner_steps=6,
                               inner_batch_size=inner_batch_size, vectorize=v) for v in (True, False))

    assert_dicts_close(pseudo_gradient(vmapped, batch, 2), pseudo_gradient(looped, batch, 2), rtol=1e-5, atol=1e-7)
    a, b = vmapped.meta_train_step(batch), looped.meta_train_step(batch)
    for name in ("meta_loss", "meta_loss_pre", "score", "score_pre"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-5), name
    vmapped.eval()
    looped.eval()
    scores_a, scores_b = vmapped.evaluate(batch), looped.evaluate(batch)
    for name in ("loss", "loss_pre", "score", "score_pre"):
        torch.testing.assert_close(getattr(scores_a, name), getattr(scores_b, name), rtol=1e-5, atol=1e-6)


def test_outer_sgd_step_moves_theta_towards_the_mean_adapted_weights() -> None:
    """With the trainer's plain SGD at lr eps, one meta-step gives theta + eps * mean(phi - theta);
    at eps = 1 the new initialisation is the mean of the adapted weights."""
    model = tiny_tanh_mlp(seed=2)
    batch = sinusoid_batch(3, seed=6, shots=6)
    algorithm = Reptile(model, Regression(), inner_lr=0.05, inner_steps=3, inner_optimizer=InnerSGD())
    theta = snapshot(model)
    phis = [algorithm.adapt(task) for task in batch]
    mean_phi = {n: torch.stack([phi[n].detach() for phi in phis]).mean(0) for n in theta}

    for eps in (1.0, 0.3):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(theta[name])
        optimizer = torch.optim.SGD(algorithm.parameters(), lr=eps)
        optimizer.zero_grad(set_to_none=True)
        algorithm.meta_train_step(batch)
        optimizer.step()
        assert_dicts_close(snapshot(model), {n: theta[n] + eps * (mean_phi[n] - theta[n]) for n in theta},
                           rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 3. The inner Adam with beta1 = 0 is torch.optim.Adam's.
# ---------------------------------------------------------------------------------------------


def reference_adam(model: nn.Module, task: Task, lr: float, betas: tuple[float, float], steps: int,
                   minibatches: Tensor | None) -> Params:
    """torch.optim.Adam stepping cloned parameters on the support set (or the given minibatches)."""
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(params.values(), lr=lr, betas=betas, eps=1e-8)
    for step in range(steps):
        index = torch.arange(len(task.support_x)) if minibatches is None else minibatches[step]
        optimizer.zero_grad()
        mse_with(model, params, task.support_x[index], task.support_y[index]).backward()
        optimizer.step()
    return {name: p.detach() for name, p in params.items()}


@VECTORIZE
@pytest.mark.parametrize("inner_batch_size", [None, 4])
def test_inner_adam_matches_torch_optim_adam(inner_batch_size: int | None, vectorize: bool) -> None:
    """`adapt` and the serial pseudo-gradient follow torch.optim.Adam(betas=(0, 0.999)); Adam with
    beta1 = 0.9 would land clearly elsewhere."""
    model = tiny_tanh_mlp(seed=3)
    task = sinusoid_batch(1, seed=7, shots=6)[0]
    lr, steps, step = 0.05, 6, 5
    algorithm = Reptile(model, Regression(), inner_state="task", inner_lr=lr, inner_steps=steps,
                        inner_optimizer=InnerAdam(betas=(0.0, 0.999)), inner_batch_size=inner_batch_size,
                        vectorize=vectorize)
    minibatches = (None if inner_batch_size is None
                   else minibatch_indices(6, inner_batch_size, steps, torch.Generator().manual_seed(step)))
    expected = reference_adam(model, task, lr, (0.0, 0.999), steps, minibatches)

    algorithm.set_progress(step, 100)
    assert_dicts_close(detach(algorithm.adapt(task)), expected, rtol=1e-10, atol=1e-12)
    theta = snapshot(model)
    grads = pseudo_gradient(algorithm, stack_tasks([task]), step=step)
    assert_dicts_close(grads, {n: theta[n] - expected[n] for n in theta}, rtol=1e-9, atol=1e-12)

    momentum = reference_adam(model, task, lr, (0.9, 0.999), steps, minibatches)
    assert max((momentum[n] - expected[n]).abs().max().item() for n in theta) > 1e-3


def detach(params: Params) -> Params:
    return {name: p.detach() for name, p in params.items()}


# ---------------------------------------------------------------------------------------------
# 3b. inner_state=carried: the published code's Adam, whose moments outlive each task.
# ---------------------------------------------------------------------------------------------


def set_weights(model: nn.Module, weights: Params) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])


def published_reptile(model: nn.Module, batches: list[TaskBatch], lr: float, steps: int, eps: float,
                      fresh: bool) -> tuple[nn.Module, torch.optim.Adam]:
    """Reptile's published training loop by hand: an Adam (betas 0, 0.999) steps the model's own weights;
    each task restores the initialisation, takes `steps` full-batch steps and records the weights; the
    meta-step moves the initialisation `eps` of the way to their mean. The Adam is created once, so its
    moments and step count carry from task to task, or (`fresh`) anew for every task."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    for batch in batches:
        theta, ends = snapshot(model), []
        for task in batch:
            if fresh:
                optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
            for _ in range(steps):
                optimizer.zero_grad()
                F.mse_loss(model(task.support_x), task.support_y).backward()
                optimizer.step()
            ends.append(snapshot(model))
            set_weights(model, theta)
        set_weights(model, {n: theta[n] + eps * (torch.stack([e[n] for e in ends]).mean(0) - theta[n]) for n in theta})
    return model, optimizer


def reptile_steps(algorithm: Reptile, batches: list[TaskBatch], eps: float) -> None:
    """Meta-steps through the trainer's route: the pseudo-gradient, then plain SGD at lr `eps`."""
    optimizer = torch.optim.SGD(algorithm.parameters(), lr=eps)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        algorithm.meta_train_step(batch)
        optimizer.step()


@pytest.mark.parametrize("inner_state", ["carried", "task"])
def test_inner_state_follows_the_published_adam(inner_state: str) -> None:
    """Three meta-steps of 3 tasks: `carried` lands on the published loop's weights (one Adam for the whole
    run), `task` on the loop with a fresh Adam per task, and the two differ clearly."""
    model, lr, steps, eps = tiny_tanh_mlp(seed=6), 0.03, 4, 0.7
    batches = [sinusoid_batch(3, seed=20 + i, shots=6) for i in range(3)]
    algorithm = Reptile(copy.deepcopy(model), Regression(), inner_lr=lr, inner_steps=steps, inner_state=inner_state)
    reptile_steps(algorithm, batches, eps)
    expected, _ = published_reptile(model, batches, lr, steps, eps, fresh=inner_state == "task")
    other, _ = published_reptile(model, batches, lr, steps, eps, fresh=inner_state == "carried")
    assert_dicts_close(snapshot(algorithm.model), snapshot(expected), rtol=1e-9, atol=1e-12)
    assert max((snapshot(other)[n] - snapshot(expected)[n]).abs().max().item() for n in snapshot(model)) > 1e-3


def test_evaluation_starts_from_the_carried_state_and_leaves_it() -> None:
    """As the published evaluation: each test task adapts from the training moments, which are restored
    afterwards, so evaluating changes nothing and the next meta-step goes on as if it had not happened."""
    model, lr, steps, eps = tiny_tanh_mlp(seed=7), 0.03, 3, 0.5
    batches = [sinusoid_batch(2, seed=30 + i, shots=6) for i in range(3)]
    algorithm = Reptile(copy.deepcopy(model), Regression(), inner_lr=lr, inner_steps=steps, eval_inner_steps=steps)
    reptile_steps(algorithm, batches[:2], eps)
    reference, optimizer = published_reptile(model, batches[:2], lr, steps, eps, fresh=False)
    task = sinusoid_batch(1, seed=40, shots=6)[0]
    theta, moments = snapshot(reference), copy.deepcopy(optimizer.state_dict())
    for _ in range(steps):  # the published evaluate(): train on the test task from the full state
        optimizer.zero_grad()
        F.mse_loss(reference(task.support_x), task.support_y).backward()
        optimizer.step()
    adapted = snapshot(reference)
    set_weights(reference, theta)
    optimizer.load_state_dict(moments)

    carried = copy.deepcopy(algorithm.carried.state)
    algorithm.eval()
    assert_dicts_close(detach(algorithm.adapt(task)), adapted, rtol=1e-9, atol=1e-12)
    algorithm.evaluate(stack_tasks([task, task]))
    algorithm.train()
    assert carried[0] == algorithm.carried.state[0] == 2 * 2 * steps  # two meta-steps of two tasks
    for before, after in zip(carried[1:], algorithm.carried.state[1:]):
        assert_dicts_close(after, before, rtol=0, atol=0)
    reptile_steps(algorithm, batches[2:], eps)
    expected, _ = published_reptile(model, batches, lr, steps, eps, fresh=False)
    assert_dicts_close(snapshot(algorithm.model), snapshot(expected), rtol=1e-9, atol=1e-12)


def test_the_carried_state_is_checkpointed(tmp_path: Path) -> None:
    """The state dict holds the carried state; loaded (through a weights-only file) into a fresh Reptile,
    the next meta-step is the one the original takes."""
    batches = [sinusoid_batch(2, seed=50 + i, shots=6) for i in range(2)]
    algorithm = Reptile(tiny_tanh_mlp(seed=8), Regression(), inner_lr=0.03, inner_steps=3)
    reptile_steps(algorithm, batches[:1], 0.5)
    torch.save(algorithm.state_dict(), tmp_path / "state.pt")
    resumed = Reptile(tiny_tanh_mlp(seed=9), Regression(), inner_lr=0.03, inner_steps=3)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    reptile_steps(algorithm, batches[1:], 0.5)
    reptile_steps(resumed, batches[1:], 0.5)
    assert_dicts_close(snapshot(resumed.model), snapshot(algorithm.model), rtol=0, atol=0)
    fresh = Reptile(tiny_tanh_mlp(seed=8), Regression(), inner_lr=0.03, inner_steps=3)
    fresh.load_state_dict({**algorithm.state_dict(), "_extra_state": {"inner_state": None}})
    assert fresh.carried is not None and fresh.carried.state is None


def test_carried_state_refuses_vmap_and_compile() -> None:
    with pytest.raises(ValueError, match=r"^vectorize=True: inner_state=carried"):
        Reptile(nn.Linear(1, 1), Regression(), vectorize=True)
    algorithm = Reptile(nn.Linear(1, 1), Regression())
    assert algorithm.vectorize is False  # auto: the per-task loop
    with pytest.raises(ValueError, match=r"^compile=true: inner_state=carried"):
        algorithm.use_compile(True, torch.device("cpu"))
    assert algorithm.use_compile("auto", torch.device("cpu")) is False
    sgd = Reptile(nn.Linear(1, 1), Regression(), inner_optimizer=InnerSGD(), vectorize=True)  # SGD has no state
    assert sgd.carried is None and sgd.vectorize is True


# ---------------------------------------------------------------------------------------------
# 4. Minibatches: size, epochs, determinism from the meta-step, no global RNG.
# ---------------------------------------------------------------------------------------------


@dataclass
class RecordingRegression:
    """MSE that records the targets of every loss it computes (the targets are example ids)."""

    metric: str = "mse"
    higher_is_better: bool = False
    seen: list[list[int]] = field(default_factory=list)

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        self.seen.append(target.detach().view(-1).long().tolist())
        return F.mse_loss(prediction, target)

    def score(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target)


def id_task(n: int) -> Task:
    """A task whose support targets are the example ids 0..n-1."""
    x = torch.linspace(-1, 1, n).unsqueeze(1)
    return Task(x, torch.arange(n, dtype=torch.float32).unsqueeze(1), x[:2], x[:2])


def minibatches_seen(algorithm: Reptile, task: Task, step: int | None) -> list[list[int]]:
    """The support ids of each inner step of `adapt` at meta-step `step` (None: in eval mode)."""
    objective = algorithm.objective
    assert isinstance(objective, RecordingRegression)
    objective.seen.clear()
    algorithm.train(step is not None)
    if step is not None:
        algorithm.set_progress(step, 100)
    algorithm.adapt(task)
    return list(objective.seen)


@pytest.mark.parametrize(("n", "batch_size"), [(10, 5), (10, 4), (7, 7)])
def test_minibatches_cover_each_epoch_and_depend_only_on_the_step(n: int, batch_size: int) -> None:
    """Each inner step sees exactly `batch_size` support examples; each epoch (n consecutive draws)
    sees every example once; the same meta-step gives the same minibatches in a fresh instance
    (exact resume) whatever the global RNG; another step gives others; eval mode uses a fixed seed."""
    steps = 3 * n // batch_size + 1
    task = id_task(n)
    algorithm = Reptile(nn.Linear(1, 1), RecordingRegression(), inner_steps=steps, eval_inner_steps=steps,
                        inner_batch_size=batch_size, vectorize=False)

    seen = minibatches_seen(algorithm, task, step=3)
    assert len(seen) == steps and all(len(batch) == batch_size for batch in seen)
    stream = [i for batch in seen for i in batch]
    for start in range(0, len(stream) - n + 1, n):
        assert sorted(stream[start:start + n]) == list(range(n)), f"epoch at {start}"
    assert stream[:n] != list(range(n)), "the support set was not shuffled"
    assert stream[:n] != stream[n:2 * n], "each epoch must draw a fresh shuffle"

    rng = torch.get_rng_state()
    torch.manual_seed(1234)
    fresh = Reptile(nn.Linear(1, 1), RecordingRegression(), inner_steps=steps, eval_inner_steps=steps,
                    inner_batch_size=batch_size, vectorize=False)
    assert minibatches_seen(fresh, task, step=3) == seen
    torch.set_rng_state(rng)
    assert torch.equal(torch.get_rng_state(), rng)
    minibatches_seen(fresh, task, step=0)
    assert torch.equal(torch.get_rng_state(), rng), "the inner loop used the global RNG"
    assert minibatches_seen(fresh, task, step=4) != seen
    expected = minibatch_indices(n, batch_size, steps, torch.Generator().manual_seed(3)).tolist()
    assert seen == expected

    evaluation = minibatches_seen(algorithm, task, step=None)
    assert minibatches_seen(fresh, task, step=None) == evaluation
    assert evaluation == minibatch_indices(n, batch_size, steps, torch.Generator().manual_seed(EVAL_SEED)).tolist()


def test_without_minibatches_every_step_sees_the_full_support_set() -> None:
    algorithm = Reptile(nn.Linear(1, 1), RecordingRegression(), inner_steps=3, vectorize=False)
    assert minibatches_seen(algorithm, id_task(5), step=0) == [list(range(5))] * 3


# ---------------------------------------------------------------------------------------------
# 5. No side effects.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("create_graph", [False, True])
def test_adapt_leaves_model_unchanged(create_graph: bool, vectorize: bool) -> None:
    """`adapt` returns new tensors and leaves the parameters bitwise equal without .grad."""
    model = tiny_tanh_mlp(seed=4)
    algorithm = Reptile(model, Regression(), inner_state="task",
                        inner_lr=0.05, inner_steps=3, inner_batch_size=3, vectorize=vectorize)
    before = snapshot(model)

    adapted = algorithm.adapt(sinusoid_batch(1, seed=8, shots=6)[0], create_graph=create_graph)

    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name
        assert not torch.equal(adapted[name], before[name]), f"{name} was not adapted"


@VECTORIZE
def test_evaluate_leaves_no_gradients(vectorize: bool) -> None:
    """`evaluate` creates no .grad, keeps existing grads, and is the same at any meta-step in eval mode."""
    model = tiny_tanh_mlp(seed=5)
    algorithm = Reptile(model, Regression(), inner_state="task",
                        inner_lr=0.05, inner_steps=2, eval_inner_steps=4, inner_batch_size=3,
                        vectorize=vectorize)
    batch = sinusoid_batch(3, seed=9, shots=6)
    params = list(algorithm.parameters())
    algorithm.eval()
    algorithm.set_progress(1, 100)

    scores = algorithm.evaluate(batch)
    assert all(p.grad is None for p in params)
    assert scores.loss.shape == (3,) and scores.loss.grad_fn is None and not scores.loss.requires_grad

    algorithm.train()
    algorithm.meta_train_step(batch)
    grads = [p.grad.clone() for p in params]
    algorithm.eval()
    algorithm.set_progress(50, 100)
    again = algorithm.evaluate(batch)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads)), "evaluate changed existing grads"
    torch.testing.assert_close(again.loss, scores.loss, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 6. Learning happens.
# ---------------------------------------------------------------------------------------------


def test_short_sinusoid_run_learns_to_adapt() -> None:
    """250 meta-steps (meta-batch 5, inner SGD lr 0.02 for 8 steps on minibatches of 5 of the 10
    support points, outer SGD lr 1 annealed linearly to 0) make adaptation pay: the post-adaptation
    query MSE on held-out tasks falls well below the pre-adaptation MSE and the untrained model's."""
    algorithm = Reptile(make_mlp(seed=0), Regression(), inner_lr=0.02, inner_steps=8, inner_optimizer=InnerSGD(),
                        inner_batch_size=5)
    optimizer = torch.optim.SGD(algorithm.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=250)
    pre, post, untrained = sinusoid_run(algorithm, optimizer, steps=250, meta_batch_size=5, scheduler=scheduler)

    # Measured (evaluation adapts for eval_inner_steps = 50): untrained pre 4.47 / post 3.85;
    # trained pre 3.27 / post 0.87.
    assert post < 0.6 * pre
    assert post < 0.6 * untrained


# ---------------------------------------------------------------------------------------------
# 7. Argument checks.
# ---------------------------------------------------------------------------------------------


INVALID_ARGUMENTS: list[tuple[str, dict[str, Any]]] = [
    ("inner_batch_size=0", {"inner_batch_size": 0}),
    ("inner_batch_size=-3", {"inner_batch_size": -3}),
    ("inner_batch_size=2.5", {"inner_batch_size": 2.5}),
    ("inner_batch_size=True", {"inner_batch_size": True}),
    ("first_order=False", {"first_order": False}),
    ("second_order_steps=1", {"second_order_steps": 1}),
    ("inner_lr=-1", {"inner_lr": -1}),
    ("inner_optimizer='adam'", {"inner_optimizer": "adam"}),
    ("inner_state='moments'", {"inner_state": "moments"}),
]


@pytest.mark.parametrize(("message", "kwargs"), [pytest.param(m, k, id=m) for m, k in INVALID_ARGUMENTS])
def test_invalid_arguments_raise_value_error_naming_them(message: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + ":"):
        Reptile(nn.Linear(1, 1), Regression(), **kwargs)


@VECTORIZE
def test_inner_batch_size_larger_than_the_support_set_raises(vectorize: bool) -> None:
    algorithm = Reptile(nn.Linear(1, 1), Regression(), inner_state="task", inner_batch_size=11, vectorize=vectorize)
    batch = SinusoidTasks(k_shot=10).sample(2, "train", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^inner_batch_size=11: larger than the support set \(10 examples\)"):
        algorithm.meta_train_step(batch)
    with pytest.raises(ValueError, match=r"^inner_batch_size=11"):
        algorithm.adapt(batch[0])


# ---------------------------------------------------------------------------------------------
# 8. Configuration: reptile.yaml and the linear outer step-size schedule.
# ---------------------------------------------------------------------------------------------


def test_reptile_yaml_builds_the_papers_inner_loop(compose_cfg: Composer) -> None:
    """algorithm=reptile composes over maml.yaml into a Reptile with inner Adam (beta1 = 0)."""
    cfg = compose_cfg("algorithm=reptile", "algorithm.inner_batch_size=5")
    tasks = instantiate(cfg.dataset)
    algorithm = instantiate(cfg.algorithm, _partial_=True)(model=instantiate(cfg.model), objective=tasks.objective)
    assert isinstance(algorithm, Reptile)
    assert algorithm.inner_batch_size == 5 and algorithm.first_order
    assert algorithm.inner_state == "carried" and algorithm.carried is algorithm.optimizer
    assert isinstance(algorithm.carried.optimizer, InnerAdam) and algorithm.carried.optimizer.betas == (0.0, 0.999)
    assert (algorithm.inner_lr, algorithm.inner_steps, algorithm.eval_inner_steps) == (0.001, 5, 50)


def test_linear_schedule_anneals_the_step_size_to_exactly_zero(compose_cfg: Composer) -> None:
    """scheduler=linear: lr0 * (1 - s / max_steps) at meta-step s, reaching exactly 0 at the end."""
    cfg = compose_cfg("scheduler=linear", "trainer.max_steps=8")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(8):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1 - s / 8 for s in range(9)], abs=1e-12)
    assert lrs[-1] == 0.0


def test_reptile_trains_end_to_end_with_the_papers_outer_loop(compose_cfg: Composer) -> None:
    """algorithm=reptile with plain SGD at lr 1 and the linear schedule runs through the trainer."""
    cfg = compose_cfg("algorithm=reptile", "algorithm.inner_batch_size=5", "algorithm.eval_inner_steps=5",
                      "optimizer=sgd", "optimizer.lr=1.0", "scheduler=linear")
    results = train(cfg)
    assert results["step"] == cfg.trainer.max_steps
    state = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0


def test_eval_inner_batch_size_applies_in_eval_mode_only() -> None:
    """Training steps use inner_batch_size, evaluation eval_inner_batch_size; each is checked against
    the support set it meets, naming its own key."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1).double()
    algorithm = Reptile(model, Regression(), inner_lr=0.1, inner_steps=2, eval_inner_steps=3,
                        inner_optimizer=InnerSGD(),
                        inner_batch_size=4, eval_inner_batch_size=2)
    x = torch.arange(6, dtype=torch.float64).view(6, 1)
    seen: list[int] = []
    original = algorithm.inner_batch

    def recording(xs: torch.Tensor, ys: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = original(xs, ys, step)
        seen.append(out[0].shape[0])
        return out

    algorithm.inner_batch = recording  # type: ignore[method-assign]
    algorithm.train()
    algorithm.adapt(Task(x, x, x, x))
    assert seen == [4, 4]
    seen.clear()
    algorithm.eval()
    algorithm.adapt(Task(x, x, x, x))
    assert seen == [2, 2, 2]
    with pytest.raises(ValueError, match=r"^eval_inner_batch_size=8: larger than the support set \(6"):
        Reptile(model, Regression(), inner_batch_size=4, eval_inner_batch_size=8).eval().adapt(Task(x, x, x, x))
