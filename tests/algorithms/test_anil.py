"""Tests of ANIL: head-only adaptation against a hand-written closed form, meta-gradients of body and
head against finite differences and a plain-autograd reference that runs the whole model at every
step (no feature caching), equivalence with MAML when the head is the whole model, Conv4 with
per-step BatchNorm, learning on sinusoids and the head argument's checks."""

from __future__ import annotations

from dataclasses import astuple

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms.anil import ANIL
from metalearn.algorithms.functional import Params
from metalearn.algorithms.maml import MAML
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.models.conv import Conv4
from metalearn.models.mlp import MLP
from metalearn.models.norm import set_adaptation_step
from metalearn.objectives import Classification, Objective, Regression
from metalearn.tasks import Task, TaskBatch
from tests.algorithms.helpers import (
    VECTORIZE,
    assert_dicts_close,
    central_differences,
    make_mlp,
    meta_grads,
    sinusoid_batch,
    sinusoid_run,
    snapshot,
    tiny_tanh_mlp,
)


def reference_query_loss(model: nn.Module, task: Task, head: str, lr: float, steps: int, objective: Objective,
                         second_order: bool) -> Tensor:
    """Query loss after `steps` SGD steps on the parameters under `head` only, each step a full
    forward of the model (support passes in per-step slot 0, the query pass in slot None)."""
    params = dict(model.named_parameters())
    names = [name for name in params if name.startswith(head + ".")]
    for _ in range(steps):
        set_adaptation_step(model, 0)
        support = objective.loss(functional_call(model, params, (task.support_x,)), task.support_y)
        grads = torch.autograd.grad(support, [params[n] for n in names], create_graph=second_order)
        params = {**params, **{n: params[n] - lr * g for n, g in zip(names, grads)}}
    set_adaptation_step(model, None)
    return objective.loss(functional_call(model, params, (task.query_x,)), task.query_y)


def reference_meta_grads(model: nn.Module, batch: TaskBatch, head: str, lr: float, steps: int,
                         objective: Objective, second_order: bool) -> tuple[float, Params]:
    """The mean reference query loss and its gradient w.r.t. every model parameter."""
    loss = torch.stack([reference_query_loss(model, task, head, lr, steps, objective, second_order)
                        for task in batch]).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.item(), dict(zip(dict(model.named_parameters()), grads))


# ---------------------------------------------------------------------------------------------
# 1. Adaptation touches the head only, by plain SGD on the body's features.
# ---------------------------------------------------------------------------------------------


def hand_head_sgd(model: MLP, x: Tensor, y: Tensor, lr: float, steps: int) -> tuple[Tensor, Tensor]:
    """SGD on the head w, b of f(x) @ w.T + b, f = tanh(x W0^T + b0), with the MSE gradients written
    out: dL/dw = 2/n r^T f, dL/db = 2/n sum(r), r = f w^T + b - y."""
    with torch.no_grad():
        f = torch.tanh(x @ model.net[0].weight.T + model.net[0].bias)
        w, b = model.net[2].weight.clone(), model.net[2].bias.clone()
        for _ in range(steps):
            r = f @ w.T + b - y
            w, b = w - lr * 2 / len(x) * r.T @ f, b - lr * 2 / len(x) * r.sum(0)
    return w, b


@VECTORIZE
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_adapt_changes_only_the_head(steps: int, create_graph: bool, vectorize: bool) -> None:
    """The adapted body entries are the model's own tensors; the head equals hand-written SGD on the
    features; the model is untouched; `predict` uses the adapted head; `evaluate` leaves no grads."""
    model = tiny_tanh_mlp()
    algorithm = ANIL(model, Regression(), inner_lr=0.1, inner_steps=steps, vectorize=vectorize)
    task = sinusoid_batch(1, seed=31)[0]
    before = snapshot(model)

    adapted = algorithm.adapt(task, create_graph=create_graph)

    assert algorithm.head_name == "net.2" and adapted.keys() == before.keys()
    assert adapted["net.0.weight"] is model.net[0].weight and adapted["net.0.bias"] is model.net[0].bias
    w, b = hand_head_sgd(model, task.support_x, task.support_y, lr=0.1, steps=steps)
    torch.testing.assert_close(adapted["net.2.weight"], w)
    torch.testing.assert_close(adapted["net.2.bias"], b)
    assert not torch.equal(w, before["net.2.weight"]) and not torch.equal(b, before["net.2.bias"])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name

    x = torch.linspace(-5, 5, 7, dtype=torch.float64).unsqueeze(1)
    _, after = algorithm.predict(task, x)
    torch.testing.assert_close(after, torch.tanh(x @ before["net.0.weight"].T + before["net.0.bias"]) @ w.T + b)
    algorithm.evaluate(sinusoid_batch(2, seed=32))
    assert all(p.grad is None for p in algorithm.parameters())


def test_state_dict_is_the_models() -> None:
    """ANIL adds no state: its state_dict is the model's under `model.` (checkpoints match MAML's)."""
    model = tiny_tanh_mlp()
    for head in ("auto", ""):
        assert list(ANIL(model, Regression(), head=head).state_dict()) == [f"model.{k}" for k in model.state_dict()]


# ---------------------------------------------------------------------------------------------
# 2. Meta-gradients of body and head.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(inner_steps: int, vectorize: bool) -> None:
    """Body and head grads equal central differences of the mean query loss after head-only SGD
    (computed by the full-model reference); meta-loss and `evaluate` equal that objective."""
    model, lr, objective = tiny_tanh_mlp(), 0.1, Regression()
    batch = sinusoid_batch(3, seed=33)
    algorithm = ANIL(model, objective, inner_lr=lr, inner_steps=inner_steps, vectorize=vectorize)

    grads, result = meta_grads(algorithm, batch)

    def reference() -> float:
        with torch.enable_grad():
            losses = [reference_query_loss(model, task, "net.2", lr, inner_steps, objective, False) for task in batch]
        return torch.stack(losses).mean().item()

    assert result.meta_loss == pytest.approx(reference(), rel=1e-10)
    assert algorithm.evaluate(batch).loss.mean().item() == pytest.approx(reference(), rel=1e-10)
    assert all(grads[name].abs().sum() > 0 for name in ("net.0.weight", "net.0.bias"))
    assert_dicts_close(grads, central_differences(model, reference), rtol=1e-6, atol=1e-8)


@VECTORIZE
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_first_order_meta_gradient_matches_detached_reference(inner_steps: int, vectorize: bool) -> None:
    """First order: the inner gradients are constants, so the body's grad comes through the query
    features only; it equals the reference with detached inner gradients and differs from second order."""
    model, lr, objective = tiny_tanh_mlp(), 0.1, Regression()
    batch = sinusoid_batch(3, seed=34)
    first = ANIL(model, objective, inner_lr=lr, inner_steps=inner_steps, first_order=True, vectorize=vectorize)
    second = ANIL(model, objective, inner_lr=lr, inner_steps=inner_steps, vectorize=vectorize)

    first_grads, first_result = meta_grads(first, batch)
    second_grads, second_result = meta_grads(second, batch)

    expected_loss, expected = reference_meta_grads(model, batch, "net.2", lr, inner_steps, objective, False)
    assert first_result.meta_loss == pytest.approx(expected_loss, rel=1e-12)
    assert second_result.meta_loss == pytest.approx(expected_loss)
    assert_dicts_close(first_grads, expected)
    difference = max((first_grads[n] - second_grads[n]).abs().max().item() for n in first_grads)
    assert difference > 1e-2 * max(g.abs().max().item() for g in second_grads.values())


# ---------------------------------------------------------------------------------------------
# 3. A head that is the whole model: ANIL is MAML.
# ---------------------------------------------------------------------------------------------


@VECTORIZE
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_whole_model_head_equals_maml(first_order: bool, vectorize: bool) -> None:
    """head="" (and "auto" on a bare Linear, which resolves to "") gives MAML's adapted params,
    meta-loss, grads and evaluation, bitwise up to rounding."""
    batch = sinusoid_batch(3, seed=35)
    for model, head in ((tiny_tanh_mlp(), ""), (nn.Linear(1, 1).double(), "auto")):
        options = dict(inner_lr=0.1, inner_steps=2, first_order=first_order, vectorize=vectorize)
        anil, maml = ANIL(model, Regression(), head=head, **options), MAML(model, Regression(), **options)
        assert anil.head_name == ""

        assert_dicts_close(anil.adapt(batch[0]), maml.adapt(batch[0]))
        anil_grads, anil_result = meta_grads(anil, batch)
        maml_grads, maml_result = meta_grads(maml, batch)
        assert anil_result.meta_loss == pytest.approx(maml_result.meta_loss, rel=1e-12)
        assert_dicts_close(anil_grads, maml_grads)
        for actual, expected in zip(astuple(anil.evaluate(batch)), astuple(maml.evaluate(batch))):
            torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------
# 4. Conv4, with batch statistics and with per-step BatchNorm.
# ---------------------------------------------------------------------------------------------


def image_batch(n_tasks: int, n_way: int, shots: int, seed: int) -> TaskBatch:
    """Random 28x28 float64 images with labels 0..n_way-1, `shots` per class in support and query."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_way).repeat_interleave(shots).expand(n_tasks, -1)
    images = [torch.randn(n_tasks, n_way * shots, 1, 28, 28, generator=generator, dtype=torch.float64)
              for _ in range(2)]
    return TaskBatch(images[0], labels, images[1], labels)


@VECTORIZE
@pytest.mark.parametrize("norm", ["batch", "batch_per_step"])
def test_conv4_matches_full_model_reference(norm: str, vectorize: bool) -> None:
    """On a tiny Conv4 (hidden 4, 28x28), head "head" is found automatically; meta-loss, second-order
    grads of every parameter and the pre-adaptation loss equal the plain-autograd reference. With
    per-step BatchNorm the body's support pass uses slot 0 at every step and the query pass the last
    slot, so the body's slot-1 weights get no gradient."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Conv4(1, 3, 28, hidden=4, norm=norm, norm_steps=2).double()
    objective, batch = Classification(), image_batch(2, n_way=3, shots=2, seed=36)
    algorithm = ANIL(model, objective, inner_lr=0.4, inner_steps=2, vectorize=vectorize)
    assert algorithm.head_name == "head"

    grads, result = meta_grads(algorithm, batch)

    expected_loss, expected = reference_meta_grads(model, batch, "head", 0.4, 2, objective, True)
    assert result.meta_loss == pytest.approx(expected_loss, rel=1e-10)
    assert_dicts_close(grads, expected)
    with torch.no_grad():
        set_adaptation_step(model, None)
        loss_pre = [objective.loss(model(task.query_x), task.query_y) for task in batch]
    torch.testing.assert_close(algorithm.evaluate(batch).loss_pre, torch.stack(loss_pre))
    if norm == "batch_per_step":
        body_norm = model.features[1].weight  # slots: step 0, step 1, query
        assert torch.equal(grads["features.1.weight"][1], torch.zeros_like(body_norm[1]))
        assert grads["features.1.weight"][[0, 2]].abs().min() > 0


# ---------------------------------------------------------------------------------------------
# 5. Learning happens.
# ---------------------------------------------------------------------------------------------


def test_short_sinusoid_run_learns_to_adapt() -> None:
    """300 meta-steps (meta-batch 10, Adam 3e-3) make one head-only step worth much more: the
    post-adaptation MSE on held-out tasks falls well below the pre-adaptation MSE."""
    # A head-only step needs a larger rate than MAML's 0.01 (measured after the same run: post 2.70).
    algorithm = ANIL(make_mlp(seed=0), Regression(), inner_lr=0.05)
    pre, post, untrained = sinusoid_run(algorithm, torch.optim.Adam(algorithm.parameters(), lr=3e-3), steps=300)

    # Measured: untrained pre 4.47 / post 4.07; trained pre 3.40 / post 1.46.
    assert post < 0.6 * pre
    assert post < 0.6 * untrained


# ---------------------------------------------------------------------------------------------
# 6. The head argument.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["nope", "net.1", "net.0.weight", "net.2.", "auto "])
def test_bad_head_raises_value_error_naming_it(head: str) -> None:
    """A name that is no submodule, or a submodule without parameters (net.1 is Tanh), is refused."""
    with pytest.raises(ValueError, match=f"^head='{head}': must name a submodule"):
        ANIL(tiny_tanh_mlp(), Regression(), head=head)


class Body(nn.Module):
    def __init__(self, scale: float = 1.0, twice: bool = False) -> None:
        super().__init__()
        self.body, self.head, self.spare = nn.Linear(1, 4), nn.Linear(4, 4), nn.Linear(4, 1)
        self.scale, self.twice = scale, twice

    def forward(self, x: Tensor) -> Tensor:
        h = self.head(self.body(x))
        return self.scale * (self.head(h) if self.twice else h)[:, :1]


@pytest.mark.parametrize(("head", "model"), [("head", Body(scale=2.0)), ("head", Body(twice=True)),
                                             ("spare", Body())], ids=["after_head", "twice", "unused"])
def test_head_whose_output_is_not_the_models_is_refused(head: str, model: nn.Module) -> None:
    """Caching features is only right if the model's output is one call of the head: anything else
    is a ValueError naming the head, at adaptation and at meta-training."""
    algorithm = ANIL(model, Regression(), head=head)
    batch = SinusoidTasks().sample(2, "train", torch.Generator().manual_seed(0))
    message = f"^head='{head}': the model's output must be the output of one call of the head"
    with pytest.raises(ValueError, match=message):
        algorithm.adapt(batch[0])
    with pytest.raises(ValueError, match=message):
        algorithm.meta_train_step(batch)
