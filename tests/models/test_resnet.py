"""ResNet-12: shapes, embedding mode, residual structure, and gradients reach every parameter."""

from __future__ import annotations

import pytest
import torch

from metalearn.models.resnet import ResNet12


@pytest.mark.parametrize(("pool", "embedding"), [("avg", 40), ("flatten", 40 * 2 * 2)])
def test_shapes(pool: str, embedding: int) -> None:
    model = ResNet12(3, 5, 32, channels=(8, 16, 24, 40), pool=pool)
    assert model.embedding_size == embedding
    assert model(torch.rand(4, 3, 32, 32)).shape == (4, 5)
    embedder = ResNet12(3, None, 32, channels=(8, 16, 24, 40), pool=pool)
    assert embedder(torch.rand(2, 3, 32, 32)).shape == (2, embedding)


def test_default_widths_give_a_640_embedding_on_84px() -> None:
    model = ResNet12(3, None, 84)
    assert model.embedding_size == 640
    assert sum(p.numel() for p in model.parameters()) > 12_000_000  # ResNet-12 has about 12.4M parameters


def test_every_parameter_gets_a_gradient() -> None:
    model = ResNet12(1, 3, 16, channels=(4, 4, 8, 8), norm="batch")
    model(torch.rand(6, 1, 16, 16)).logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_shortcut_is_used() -> None:
    """Zeroing the body's last norm leaves the block equal to LeakyReLU(shortcut) pooled."""
    model = ResNet12(1, None, 8, channels=(4,), norm="none", pool="flatten")
    block = model.features[0]
    with torch.no_grad():
        block.body[-2].weight.zero_()  # the third conv (the last layer is its identity norm)
        x = torch.rand(2, 1, 8, 8)
        expected = block.out(block.shortcut(x))
        assert torch.allclose(block(x), expected)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="pool='max'"):
        ResNet12(3, 5, 84, pool="max")
