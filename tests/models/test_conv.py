"""Conv-4: shapes, normalisation modes, and that MAML meta-learns through it."""

from __future__ import annotations

import pytest
import torch

from metalearn.algorithms.maml import MAML
from metalearn.data.episodes import ClassImages, EpisodeSampler
from metalearn.models.conv import Conv4


@pytest.mark.parametrize(("downsample", "image_size", "embedding"), [("stride", 28, 256), ("maxpool", 28, 64),
                                                                      ("maxpool", 84, 1600)])
def test_shapes(downsample: str, image_size: int, embedding: int) -> None:
    model = Conv4(3, 5, image_size, downsample=downsample)
    assert model.embedding_size == embedding
    assert model(torch.rand(7, 3, image_size, image_size)).shape == (7, 5)
    embedder = Conv4(3, None, image_size, downsample=downsample)
    assert embedder(torch.rand(2, 3, image_size, image_size)).shape == (2, embedding)


def test_width_is_configurable() -> None:
    model = Conv4(3, 5, 84, hidden=32)
    assert model.embedding_size == 32 * 5 * 5


@pytest.mark.parametrize(("norm", "buffers"), [("batch", 0), ("batch_running", 12), ("group", 0), ("none", 0)])
def test_norm_modes(norm: str, buffers: int) -> None:
    model = Conv4(1, 5, 28, norm=norm)
    assert len(list(model.buffers())) == buffers
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    single = model(x[:1])
    batched = model(x)[:1]
    # Transductive BatchNorm uses the batch's statistics even in eval mode; the others do not.
    assert torch.allclose(single, batched, atol=1e-5) == (norm != "batch")


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="norm='layer'"):
        Conv4(1, 5, 28, norm="layer")
    with pytest.raises(ValueError, match="downsample='avg'"):
        Conv4(1, 5, 28, downsample="avg")


def test_maml_learns_on_a_small_image_problem() -> None:
    """Two-way one-shot episodes whose classes are bright squares at fixed positions: MAML through
    Conv-4 goes from chance to clearly above chance after adaptation within a few dozen steps."""
    g = torch.Generator().manual_seed(0)
    images, labels = [], []
    for c in range(8):
        base = torch.zeros(30, 1, 12, 12)
        row, col = divmod(c, 4)
        base[:, :, row * 6: row * 6 + 5, col * 3: col * 3 + 3] = 1.0
        noisy = (base * 0.7 + 0.3 * torch.rand(base.shape, generator=g)) * 255
        images.append(noisy.to(torch.uint8))
        labels.append(torch.full((30,), c))
    data = ClassImages(torch.cat(images), torch.cat(labels), [str(c) for c in range(8)])
    tasks = EpisodeSampler({"train": data, "val": data, "test": data}, n_way=2, k_shot=1, k_query=5)
    torch.manual_seed(0)
    model = Conv4(1, 2, 12, hidden=8, norm="batch", downsample="stride")
    algorithm = MAML(model, tasks.objective, inner_lr=0.4, eval_inner_steps=3, vectorize=False)
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=3e-3)
    held_out = tasks.sample(100, "test", torch.Generator().manual_seed(1))
    for _ in range(60):
        optimizer.zero_grad()
        algorithm.meta_train_step(tasks.sample(8, "train", g))
        optimizer.step()
    algorithm.eval()
    scores = algorithm.evaluate(held_out)
    assert scores.score_pre.mean() < 0.65
    assert scores.score.mean() > 0.8
