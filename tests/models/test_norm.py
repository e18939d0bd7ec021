"""Normalisation modes: per-step BatchNorm against plain BatchNorm, slot selection, and that MAML's
inner loop uses one slot per step and the final slot for the query pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.maml import MAML
from metalearn.models.conv import Conv4
from metalearn.models.norm import NORMS, PerStepBatchNorm2d, norm_layer, set_adaptation_step
from metalearn.objectives import Classification
from metalearn.tasks import TaskBatch


def test_each_slot_is_batchnorm_with_its_own_weights() -> None:
    torch.manual_seed(0)
    layer = PerStepBatchNorm2d(3, steps=2)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    x = torch.randn(5, 3, 4, 4)
    for step, slot in [(0, 0), (1, 1), (7, 1), (None, 2)]:  # later steps share the last step slot
        layer.set_step(step)
        reference = nn.BatchNorm2d(3, track_running_stats=False)
        with torch.no_grad():
            reference.weight.copy_(layer.weight[slot])
            reference.bias.copy_(layer.bias[slot])
        assert torch.allclose(layer(x), reference(x), atol=1e-6)
    # Batch statistics at evaluation too, and no buffers: nothing carries over between tasks.
    layer.eval()
    layer.set_step(None)
    plain = F.batch_norm(x, None, None, layer.weight[2], layer.bias[2], training=True)
    assert torch.allclose(layer(x), plain, atol=1e-6)
    assert list(layer.buffers()) == []
    assert not torch.allclose(layer(x[:2])[:1], layer(x)[:1])


def test_only_the_selected_slot_gets_gradients() -> None:
    layer = PerStepBatchNorm2d(2, steps=3)
    set_adaptation_step(nn.Sequential(layer), 1)
    (layer(torch.randn(4, 2, 3, 3)) * torch.randn(4, 2, 3, 3)).sum().backward()
    assert layer.weight.grad is not None
    used = layer.weight.grad.abs().sum(dim=1) > 0
    assert used.tolist() == [False, True, False, False]


@pytest.mark.parametrize("norm", NORMS)
def test_every_mode_builds(norm: str) -> None:
    layer = norm_layer(norm, 8, steps=2)
    assert layer(torch.randn(3, 8, 2, 2)).shape == (3, 8, 2, 2)


def tiny_batch(tasks: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(3)
    return TaskBatch(torch.rand(tasks, 4, 1, 8, 8, generator=g), torch.tensor([0, 1, 0, 1]).repeat(tasks, 1),
                     torch.rand(tasks, 6, 1, 8, 8, generator=g), torch.tensor([0, 1, 0, 1, 0, 1]).repeat(tasks, 1))


def per_step_maml(first_order: bool, vectorize: bool) -> MAML:
    torch.manual_seed(0)
    model = Conv4(1, 2, 8, hidden=4, blocks=2, norm="batch_per_step", norm_steps=1)
    return MAML(model, Classification(), inner_lr=0.5, first_order=first_order, vectorize=vectorize)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_maml_uses_the_step_slot_for_support_and_the_final_slot_for_query(first_order: bool) -> None:
    """One inner step: the support pass uses slot 0 and the query pass slot 1. Slot 1 always gets a
    meta-gradient; slot 0 only through the second-order path (it shapes the inner gradients of the
    other weights, but the query pass never reads it)."""
    algorithm = per_step_maml(first_order, vectorize=False)
    algorithm.meta_train_step(tiny_batch())
    norm = algorithm.model.features[1]
    assert isinstance(norm, PerStepBatchNorm2d)
    assert norm.weight.grad is not None
    slot0, slot1 = norm.weight.grad.abs().sum(dim=1).tolist()
    assert slot1 > 0
    assert (slot0 == 0) == first_order
    assert norm.slot == 1  # left at the final slot, so plain forward passes see the adapted-model weights


def test_per_step_norm_gives_the_same_meta_gradient_with_vmap_and_the_loop() -> None:
    grads = []
    for vectorize in (True, False):
        algorithm = per_step_maml(first_order=False, vectorize=vectorize)
        algorithm.meta_train_step(tiny_batch())
        grads.append([p.grad.clone() for p in algorithm.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)
