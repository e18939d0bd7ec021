"""MAML with a learned inner optimizer (algorithm=maml_lstm): the inner step is the LSTM's update of the
flattened gradient, the meta-gradient reaches the LSTM's weights and the initialisation through the
inner steps (against finite differences, on both the vmap and the loop path), an l2o run's optimizer
loads as the starting point, and a short sinusoid run learns to adapt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from metalearn.algorithms import functional
from metalearn.algorithms.functional import Params
from metalearn.algorithms.l2o import LearnedOptimizer
from metalearn.algorithms.maml import MAML
from metalearn.checkpoint import save_checkpoint
from metalearn.l2o.optimizer import LSTMOptimizer
from metalearn.l2o.problems import Quadratic
from metalearn.l2o.tasks import ProblemTasks
from metalearn.objectives import Regression
from tests.algorithms.helpers import (
    VECTORIZE,
    assert_dicts_close,
    central_differences,
    make_mlp,
    meta_grads,
    mse_with,
    sinusoid_batch,
    sinusoid_run,
    tiny_tanh_mlp,
)


def lstm(seed: int = 3, **kwargs: float) -> LSTMOptimizer:
    torch.manual_seed(seed)
    return LSTMOptimizer(hidden=4, **kwargs).double()  # type: ignore[arg-type]


def reference_query_losses(model: nn.Module, rule: LSTMOptimizer, batch: object, steps: int) -> Tensor:
    """Each task's query MSE after `steps` inner steps θ ← θ + LSTM(∇θ) written with plain autograd and the
    LSTM's fused forward (not the code under test's unfused step)."""
    losses = []
    for task in batch:  # type: ignore[attr-defined]
        params: Params = dict(model.named_parameters())
        state = rule.initial_state(sum(p.numel() for p in params.values()), torch.float64)
        for _ in range(steps):
            grads = torch.autograd.grad(mse_with(model, params, task.support_x, task.support_y), list(params.values()),
                                        create_graph=True)
            update, state = rule(torch.cat([g.reshape(-1) for g in grads]), state)
            parts = update.split([p.numel() for p in params.values()])
            params = {name: p + u.view_as(p) for (name, p), u in zip(params.items(), parts, strict=True)}
        losses.append(mse_with(model, params, task.query_x, task.query_y))
    return torch.stack(losses)


@VECTORIZE
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_meta_gradient_reaches_the_lstm_and_matches_finite_differences(inner_steps: int, vectorize: bool) -> None:
    model, rule = tiny_tanh_mlp(), lstm()
    batch = sinusoid_batch(2, seed=5)
    algorithm = MAML(model, Regression(), inner_steps=inner_steps, inner_optimizer=rule, vectorize=vectorize)
    assert {name for name, _ in algorithm.named_parameters()} >= {f"inner_rule.{n}" for n, _ in rule.named_parameters()}
    model_grads, result = meta_grads(algorithm, batch)
    rule_grads, _ = meta_grads(algorithm, batch, of=rule)

    def objective() -> float:
        with torch.enable_grad():  # the inner gradients, also inside central_differences' no_grad
            return reference_query_losses(model, rule, batch, inner_steps).mean().item()

    assert result.meta_loss == pytest.approx(objective(), rel=1e-10)
    assert_dicts_close(model_grads, central_differences(model, objective), rtol=1e-6, atol=1e-8)
    assert_dicts_close(rule_grads, central_differences(rule, objective), rtol=1e-6, atol=1e-8)
    assert max(g.abs().max().item() for g in rule_grads.values()) > 1e-4  # the LSTM does learn


def test_fixed_lstm_gets_no_gradient_and_loads_an_l2o_run(tmp_path: Path) -> None:
    trained = LearnedOptimizer(lstm(seed=9), ProblemTasks(Quadratic(dim=3)).objective)
    run = tmp_path / "run"
    save_checkpoint({"algorithm": trained.state_dict()}, run / "checkpoints" / "best.pt")
    rule = lstm(seed=1)
    algorithm = MAML(tiny_tanh_mlp(), Regression(), inner_optimizer=rule, inner_optimizer_checkpoint=str(run),
                     learn_inner_optimizer=False)
    assert_dicts_close(dict(rule.state_dict()), dict(trained.model.state_dict()))
    model_grads, _ = meta_grads(algorithm, sinusoid_batch(2, seed=6))
    assert model_grads.keys() == dict(algorithm.model.named_parameters()).keys()
    assert not any(p.requires_grad for p in rule.parameters())
    assert [name for name, p in algorithm.named_parameters() if p.requires_grad] == [
        f"model.{name}" for name in model_grads]
    with pytest.raises(ValueError, match="inner_optimizer_checkpoint=.*not a learned optimizer of this shape"):
        MAML(tiny_tanh_mlp(), Regression(), inner_optimizer=LSTMOptimizer(hidden=5),
             inner_optimizer_checkpoint=str(run))
    with pytest.raises(ValueError, match="inner_optimizer_checkpoint=.*no such checkpoint"):
        MAML(tiny_tanh_mlp(), Regression(), inner_optimizer=rule, inner_optimizer_checkpoint=str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="inner_optimizer_checkpoint=.*needs a learned inner_optimizer"):
        MAML(tiny_tanh_mlp(), Regression(), inner_optimizer_checkpoint=str(run))
    with pytest.raises(ValueError, match="inner_optimizer: Linear is not a learned update rule"):
        MAML(tiny_tanh_mlp(), Regression(), inner_optimizer=nn.Linear(2, 2))


def test_short_sinusoid_run_learns_to_adapt_with_the_lstm() -> None:
    """400 meta-steps: the learned inner optimizer's two steps lower the held-out MSE well below the
    pre-adaptation MSE and below the untrained pair's post-adaptation MSE (measured: pre 5.15, post 2.79,
    untrained post 4.38)."""
    torch.manual_seed(0)
    rule = LSTMOptimizer(hidden=10, output_scale=0.01)
    algorithm = MAML(make_mlp(seed=0), Regression(), inner_steps=2, inner_optimizer=rule)
    pre, post, untrained = sinusoid_run(algorithm, torch.optim.Adam(algorithm.parameters(), lr=3e-3), steps=400)
    assert post < 0.7 * pre
    assert post < 0.8 * untrained


def test_too_large_a_graph_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before allocating anything, a one-line error names the setting when the LSTM's graph over the
    model's parameters cannot fit in the free memory."""
    algorithm = MAML(tiny_tanh_mlp(), Regression(), inner_optimizer=lstm())
    monkeypatch.setattr(functional, "available_memory", lambda device: 1000)
    coordinates = sum(p.numel() for p in algorithm.model.parameters())
    with pytest.raises(ValueError, match=rf"inner_optimizer: a learned LSTMOptimizer over the model's {coordinates} "
                                         "parameters needs about .* GiB per inner step"):
        algorithm.meta_train_step(sinusoid_batch(2, seed=6))
    assert functional.available_memory(torch.device("cpu")) > 0
