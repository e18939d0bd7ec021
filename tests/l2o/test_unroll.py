"""Unrolled optimisation (metalearn.l2o): the problem families against hand computations, the baselines
against torch.optim, the meta-gradient (with the optimizee's gradient as a constant input, as in
Andrychowicz et al., 2016) against finite differences, truncated BPTT, and a short meta-training run
whose learned optimizer beats the untrained one and tuned SGD on held-out quadratics."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from metalearn.l2o.optimizer import LSTMOptimizer, UpdateRule
from metalearn.l2o.problems import MLPClassifier, Quadratic, QuadraticProblem, omniglot_classifier
from metalearn.l2o.unroll import (
    SGD,
    Adam,
    Momentum,
    RMSprop,
    meta_loss,
    meta_train_truncated,
    tune_learning_rate,
    unroll,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_quadratic_by_hand_and_reproducible() -> None:
    family = Quadratic(dim=2, dtype=F64)
    w = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]], dtype=F64)
    problem = QuadraticProblem(w, torch.tensor([[1.0, 1.0]], dtype=F64), torch.zeros(1, 2, dtype=F64),
                               seeds=torch.zeros(1, dtype=torch.long))
    # Wθ − y at θ = (1, 1): (3 − 1, −1 − 1) = (2, −2): loss 8.
    torch.testing.assert_close(family.loss(problem, torch.ones(1, 2, dtype=F64), 0), torch.tensor([8.0], dtype=F64))
    a, b = Quadratic(dim=10).sample(5, gen(3)), Quadratic(dim=10).sample(5, gen(3))
    assert a.w.shape == (5, 10, 10) and a.y.shape == (5, 10) and a.theta0.shape == (5, 10)
    assert torch.equal(a.w, b.w) and torch.equal(a.theta0, b.theta0) and torch.equal(a.seeds, b.seeds)
    noisy = Quadratic(dim=10, noise_std=0.5)
    assert torch.equal(noisy.loss(a, a.theta0, 4), noisy.loss(a, a.theta0, 4))
    assert not torch.equal(noisy.loss(a, a.theta0, 4), noisy.loss(a, a.theta0, 5))


def test_mlp_matches_a_module_and_draws_reproducible_minibatches() -> None:
    x, y = torch.randn(300, 6, generator=gen(0), dtype=F64), torch.randint(0, 3, (300,), generator=gen(1))
    family = MLPClassifier(x, y, batch_size=16)
    assert family.n_params == 6 * 20 + 20 + 20 * 3 + 3 and MLPClassifier(x, y, wider=True).hidden == 40
    problem = family.sample(2, gen(2))
    theta = torch.randn(2, family.n_params, generator=gen(3), dtype=F64)
    xb, yb = family.minibatch(problem, 7)
    assert torch.equal(yb, family.minibatch(problem, 7)[1]) and not torch.equal(yb, family.minibatch(problem, 8)[1])
    for i in range(2):  # problem i against nn.Sequential carrying its slice of θ
        first, second = torch.nn.Linear(6, 20).double(), torch.nn.Linear(20, 3).double()
        w1, b1, w2, b2 = theta[i].split([120, 20, 60, 3])
        with torch.no_grad():
            first.weight.copy_(w1.view(6, 20).T), first.bias.copy_(b1)
            second.weight.copy_(w2.view(20, 3).T), second.bias.copy_(b2)
            net = torch.nn.Sequential(first, torch.nn.Sigmoid(), second)
            expected = torch.nn.functional.cross_entropy(net(xb[i]), yb[i])
        torch.testing.assert_close(family.loss(problem, theta, 7)[i], expected)
    with pytest.raises(ValueError, match="labels span 0 … 2"):
        MLPClassifier(x, y, classes=2)
    # The small initialisation predicts nearly uniformly: a loss of about log 3.
    torch.testing.assert_close(family.loss(problem, problem.theta0, 0), torch.full((2,), math.log(3), dtype=F64),
                               atol=0.02, rtol=0)


def test_unrolled_sgd_is_gradient_descent_by_hand() -> None:
    family = Quadratic(dim=4, dtype=F64)
    problem = family.sample(3, gen(0))
    losses, theta, _ = unroll(SGD(0.01), family, problem, problem.theta0, 4, create_graph=False)
    expected, w, y = problem.theta0, problem.w, problem.y
    for t in range(4):
        residual = (w @ expected.unsqueeze(-1)).squeeze(-1) - y
        torch.testing.assert_close(losses[t], (residual**2).sum(-1))
        expected = expected - 0.01 * 2 * (w.transpose(1, 2) @ residual.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(theta, expected)
    assert losses.shape == (5, 3) and losses.grad_fn is None


@pytest.mark.parametrize("ours, torch_optim", [
    (SGD(0.01), lambda p: torch.optim.SGD(p, lr=0.01)),
    (Momentum(0.01), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
    (RMSprop(0.01), lambda p: torch.optim.RMSprop(p, lr=0.01)),
    (Adam(0.1), lambda p: torch.optim.Adam(p, lr=0.1)),
], ids=["sgd", "momentum", "rmsprop", "adam"])
def test_baselines_follow_torch_optim(ours: UpdateRule,
                                      torch_optim: Callable[[list[Tensor]], torch.optim.Optimizer]) -> None:
    family = Quadratic(dim=5, dtype=F64)
    problem = family.sample(4, gen(1))
    param = problem.theta0.clone().requires_grad_(True)
    reference = torch_optim([param])
    thetas = [param.detach().clone()]
    for t in range(5):
        reference.zero_grad()
        family.loss(problem, param, t).sum().backward()
        reference.step()
        thetas.append(param.detach().clone())
    for steps in range(1, 6):  # the same point after every step
        _, theta, _ = unroll(ours, family, problem, problem.theta0, steps, create_graph=False)
        torch.testing.assert_close(theta, thetas[steps])


class Recorder:
    """An update rule that passes through to `rule` and keeps the gradients it was given."""

    def __init__(self, rule: LSTMOptimizer) -> None:
        self.rule, self.grads = rule, list[Tensor]()

    def initial_state(self, n_coordinates: int, dtype: torch.dtype | None = None) -> Any:
        return self.rule.initial_state(n_coordinates, dtype)

    def __call__(self, grad: Tensor, state: Any) -> tuple[Tensor, Any]:
        self.grads.append(grad)
        return self.rule(grad, state)


def test_meta_gradient_against_finite_differences() -> None:
    torch.manual_seed(0)
    family, opt = Quadratic(dim=3, dtype=F64), LSTMOptimizer(hidden=3).double()
    problem = family.sample(2, gen(5))
    recorder = Recorder(opt)
    losses, _, _ = unroll(recorder, family, problem, problem.theta0, 3)
    assert all(g.grad_fn is None and not g.requires_grad for g in recorder.grads)  # ∇_t is a constant input
    meta_loss(losses).backward()

    def replayed() -> float:
        """The meta-loss with each ∇_t frozen at its recorded value: the function whose gradient the
        paper's meta-gradient is (second derivatives of the optimizee dropped)."""
        with torch.no_grad():
            theta, state, total = problem.theta0, opt.initial_state(6), []
            for grad in recorder.grads:
                update, state = opt(grad, state)
                theta = theta + update.view_as(theta)
                total.append(family.loss(problem, theta, 0))
            return float(torch.stack(total).mean())

    def true_meta_loss() -> float:
        with torch.no_grad():
            return float(meta_loss(unroll(opt, family, problem, problem.theta0, 3, create_graph=False)[0]))

    eps, gaps = 1e-6, []
    for name, index in [("lstm.weight_ih_l0", (0, 0)), ("lstm.weight_hh_l1", (5, 2)), ("lstm.bias_hh_l0", (9,)),
                        ("output.weight", (0, 1)), ("output.bias", (0,))]:
        weight = opt.get_parameter(name)
        analytic = float(weight.grad[index])  # type: ignore[index]
        derivatives = []
        for function in (replayed, true_meta_loss):
            with torch.no_grad():
                weight[index] += eps
                plus = function()
                weight[index] -= 2 * eps
                minus = function()
                weight[index] += eps
            derivatives.append((plus - minus) / (2 * eps))
        assert analytic == pytest.approx(derivatives[0], rel=1e-6, abs=1e-9), name
        gaps.append(abs(derivatives[1] - analytic))
    # The dropped second-order term is real: the full derivative of the meta-loss differs, by little over
    # three steps of a small untrained optimizer (up to about 1e-5) but far more than finite differences err.
    assert max(gaps) > 1e-6


def test_truncated_bptt_detaches_between_segments() -> None:
    torch.manual_seed(0)
    family, opt = Quadratic(dim=3, dtype=F64), LSTMOptimizer(hidden=4).double()
    problem = family.sample(2, gen(6))
    seen: list[tuple[float, list[Tensor]]] = []

    def step_fn(loss: Tensor) -> None:  # no optimizer step: the trajectory is the untruncated one
        seen.append((loss.item(), list(torch.autograd.grad(loss, list(opt.parameters())))))

    losses = meta_train_truncated(opt, family, problem, 7, 3, step_fn)
    assert losses.shape == (8, 2) and len(seen) == 3  # segments of 3, 3 and 1 steps
    with pytest.raises(ValueError, match="unroll_length=0"):
        meta_train_truncated(opt, family, problem, 7, 0, step_fn)
    full, theta, state = unroll(opt, family, problem, problem.theta0, 7, create_graph=False)
    torch.testing.assert_close(losses, full)
    # The second segment's gradient is that of a fresh unroll from the detached θ_3 and state_3.
    _, theta3, state3 = unroll(opt, family, problem, problem.theta0, 3, create_graph=False)
    segment, _, _ = unroll(opt, family, problem, theta3, 3, state=state3, first_step=3)
    assert seen[1][0] == pytest.approx(meta_loss(segment).item())
    for ours, reference in zip(seen[1][1], torch.autograd.grad(meta_loss(segment), list(opt.parameters()))):
        torch.testing.assert_close(ours, reference)


def test_evaluation_builds_no_graph_and_mlp_unrolls() -> None:
    opt = LSTMOptimizer(hidden=4)
    x, y = torch.randn(200, 5, generator=gen(0)), torch.randint(0, 2, (200,), generator=gen(1))
    family = MLPClassifier(x, y, hidden=8, batch_size=32)
    problem = family.sample(3, gen(2))
    losses, theta, (h, _) = unroll(opt, family, problem, problem.theta0, 4, create_graph=False)
    assert losses.shape == (5, 3) and not (losses.requires_grad or theta.requires_grad or h.requires_grad)
    assert all(p.grad is None for p in opt.parameters())
    losses, _, _ = unroll(opt, family, problem, problem.theta0, 4)
    meta_loss(losses).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in opt.parameters())


def test_tune_learning_rate_picks_the_lowest_finite_loss() -> None:
    family = Quadratic(dim=5)
    problems = family.sample(8, gen(0))
    lrs = [10.0, 1e-1, 1e-2, 1e-3, 1e-4]  # 10 and 0.1 diverge
    finals = [float(unroll(SGD(lr), family, problems, problems.theta0, 20, create_graph=False)[0][-1].mean())
              for lr in lrs]
    assert not math.isfinite(finals[0])
    best = tune_learning_rate(family, SGD, lrs, 20, problems)
    assert best == lrs[min(range(1, 5), key=finals.__getitem__)] and best in (1e-2, 1e-3)


def meta_train_and_compare(trajectories: int, meta_lr: float, seed: int = 0) -> dict[str, float]:
    """Meta-train an LSTM optimizer on 10-dimensional quadratics (horizon 100, truncated BPTT with
    unrolls of 20, 32 problems per trajectory) and report each optimizer's mean loss after 100 steps on
    200 held-out quadratics; the baselines' learning rates are tuned on 200 other quadratics."""
    torch.manual_seed(seed)
    family, opt = Quadratic(dim=10), LSTMOptimizer()
    untrained = LSTMOptimizer()
    untrained.load_state_dict(opt.state_dict())
    meta_optimizer = torch.optim.Adam(opt.parameters(), lr=meta_lr)

    def step_fn(loss: Tensor) -> None:
        meta_optimizer.zero_grad()
        loss.backward()
        meta_optimizer.step()

    generator = gen(seed + 1)
    for _ in range(trajectories):
        meta_train_truncated(opt, family, family.sample(32, generator), 100, 20, step_fn)
    held_out, tuning = family.sample(200, gen(10_000)), family.sample(200, gen(20_000))
    lrs = [10 ** (-k / 4) for k in range(-4, 17)]  # 10 … 1e-4 (tuned: Adam 1.0, SGD 0.018)
    rules: dict[str, UpdateRule] = {"learned": opt, "untrained": untrained,
                                    "sgd": SGD(tune_learning_rate(family, SGD, lrs, 100, tuning)),
                                    "adam": Adam(tune_learning_rate(family, Adam, lrs, 100, tuning))}
    return {name: float(unroll(rule, family, held_out, held_out.theta0, 100, create_graph=False)[0][-1].mean())
            for name, rule in rules.items()}


def test_meta_training_beats_untrained_and_tuned_sgd_on_quadratics() -> None:
    # 100 trajectories × 5 truncations = 500 Adam(3e-3) meta-optimizer steps (15-20 s on one thread).
    final = meta_train_and_compare(trajectories=100, meta_lr=3e-3)
    print("mean final loss on held-out quadratics:", final)
    assert final["learned"] < final["untrained"] and final["learned"] < final["sgd"]


@pytest.mark.slow
def test_longer_meta_training_at_the_papers_meta_learning_rate() -> None:
    # 300 trajectories × 5 truncations = 1500 Adam(1e-3) steps (about 60 s on one thread).
    final = meta_train_and_compare(trajectories=300, meta_lr=1e-3)
    print("mean final loss on held-out quadratics:", final)
    assert final["learned"] < final["untrained"] and final["learned"] < final["sgd"]
    assert final["learned"] < final["adam"]


def test_omniglot_classifier_labels_drawings_by_alphabet(omniglot_root: Path, cache_dir: Path) -> None:
    with zipfile.ZipFile(omniglot_root / "images_background.zip") as z:
        drawings = [n.split("/")[1] for n in z.namelist() if n.endswith(".png")]
    alphabets = sorted(set(drawings))[:3]
    family = omniglot_classifier(str(omniglot_root), alphabets=3, image_size=14, cache_dir=str(cache_dir),
                                 wider=True)
    assert family.y.bincount().tolist() == [drawings.count(a) for a in alphabets]  # every drawing, by alphabet
    assert family.x.shape == (len(family.y), 196) and 0 <= family.x.min() < family.x.max() <= 1
    assert family.classes == 3 and family.hidden == 40  # wider: twice the paper's 20 hidden units
    assert family.loss(family.sample(2, torch.Generator()), torch.zeros(2, family.n_params), 0).allclose(
        torch.tensor(math.log(3)))  # zero weights: the uniform prediction
    with pytest.raises(ValueError, match="alphabets=31"):
        omniglot_classifier(str(omniglot_root), alphabets=31, image_size=14, cache_dir=str(cache_dir))
