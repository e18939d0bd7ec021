"""Conv-4: shapes, feature maps (pool_blocks, flatten), normalisation modes, and that MAML meta-learns
through it."""

from __future__ import annotations

import pytest
import torch

from metalearn.algorithms.maml import MAML
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.images import ClassImages
from metalearn.models.conv import Conv4


@pytest.mark.parametrize(("downsample", "image_size", "embedding"), [("stride", 28, 256), ("maxpool", 28, 64),
                                                                      ("maxpool", 84, 1600)])
def test_shapes(downsample: str, image_size: int, embedding: int) -> None:
    model = Conv4(3, 5, image_size, downsample=downsample)
    assert model.embedding_size == embedding
    assert model(torch.rand(7, 3, image_size, image_size)).shape == (7, 5)
    embedder = Conv4(3, None, image_size, downsample=downsample)
    assert embedder(torch.rand(2, 3, image_size, image_size)).shape == (2, embedding)


@pytest.mark.parametrize(("downsample", "image_size", "pool_blocks", "side"), [
    ("maxpool", 28, 2, 7), ("maxpool", 84, 2, 21), ("stride", 28, 2, 7), ("maxpool", 28, 0, 28), ("maxpool", 28, 4, 1),
])
def test_feature_maps(downsample: str, image_size: int, pool_blocks: int, side: int) -> None:
    """pool_blocks=p halves the side p times (floor, as 2x2 max-pooling or stride-2 padded convolutions do);
    flatten=False returns the map itself, flatten=True the same numbers flattened."""
    torch.manual_seed(0)
    maps = Conv4(1, None, image_size, hidden=8, downsample=downsample, pool_blocks=pool_blocks, flatten=False)
    assert maps.feature_shape == (8, side, side) and maps.embedding_size == 8 * side * side
    x = torch.rand(3, 1, image_size, image_size)
    out = maps(x)
    assert out.shape == (3, 8, side, side)
    flat = Conv4(1, None, image_size, hidden=8, downsample=downsample, pool_blocks=pool_blocks)
    flat.load_state_dict(maps.state_dict())  # same layers: only the final Flatten differs
    assert torch.equal(flat(x), out.flatten(1))


def test_default_downsamples_every_block_as_before() -> None:
    """pool_blocks=None is pool_blocks=blocks: the same layers and outputs."""
    torch.manual_seed(0)
    default = Conv4(1, None, 28)
    explicit = Conv4(1, None, 28, pool_blocks=4)
    assert [type(m) for m in default.features] == [type(m) for m in explicit.features]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in default.features) == 4
    assert isinstance(default.features[-1], torch.nn.Flatten) and default.feature_shape == (64,)
    explicit.load_state_dict(default.state_dict())
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(default(x), explicit(x))
    # Two pooling blocks of four: two max-pools, and the last two convolutions keep stride 1.
    relation = Conv4(1, None, 28, downsample="stride", pool_blocks=2)
    assert [c.stride for c in relation.features if isinstance(c, torch.nn.Conv2d)] == [(2, 2)] * 2 + [(1, 1)] * 2


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
    with pytest.raises(ValueError, match="pool_blocks=5: must be at most blocks=4"):
        Conv4(1, None, 28, pool_blocks=5)
    with pytest.raises(ValueError, match="pool_blocks=-1: must be an integer >= 0"):
        Conv4(1, None, 28, pool_blocks=-1)
    with pytest.raises(ValueError, match="out_features=5: a head needs flat features"):
        Conv4(1, 5, 28, flatten=False)


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


def test_channels_last_computes_the_same_values_and_gradients() -> None:
    """channels_last only changes the memory layout: weights and activations are NHWC, outputs and
    gradients equal the contiguous network's up to float32 rounding."""
    models = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        models.append(Conv4(1, 5, 28, hidden=8, norm="batch_running", channels_last=channels_last))
    plain, nhwc = models
    conv = nhwc.features[0]
    assert isinstance(conv, torch.nn.Conv2d) and conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(6, 1, 28, 28)
    outputs = [model(x) for model in models]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for out in outputs:
        out.square().sum().backward()
    # Rounding noise is relative to the largest gradients (about 40 here); the biases before BatchNorm
    # have true gradient 0, so their entries are pure noise of that size.
    scale = max(float(p.grad.abs().max()) for p in plain.parameters() if p.grad is not None)
    for (name, p), q in zip(plain.named_parameters(), nhwc.parameters()):
        assert q.grad is not None and p.grad is not None
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("norm", ["batch", "batch_running", "batch_per_step", "group"])
def test_norm_scales_start_at_one_or_uniform_as_old_pytorch(norm: str) -> None:
    """norm_init=uniform draws every normalisation scale from U[0, 1) (PyTorch's BatchNorm before 1.0) and
    leaves the shifts at zero and the convolutions as the default draws them; ones is the default."""
    torch.manual_seed(0)
    default = Conv4(1, 5, 28, norm=norm, norm_steps=2)
    torch.manual_seed(0)
    uniform = Conv4(1, 5, 28, norm=norm, norm_steps=2, norm_init="uniform")
    norms = [m for m in uniform.features if not isinstance(m, (torch.nn.Conv2d, torch.nn.ReLU, torch.nn.MaxPool2d,
                                                                torch.nn.Flatten))]
    assert len(norms) == 4
    scales = torch.cat([m.weight.detach().flatten() for m in norms])
    assert scales.min() >= 0 and scales.max() < 1 and scales.std() > 0.2  # U[0, 1): std 0.29
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in default.named_parameters()
               if n.endswith("weight") and p.dim() < 4 and not n.startswith("head"))
    convs = [(n, p) for n, p in default.named_parameters() if p.dim() == 4]
    assert all(torch.equal(p, dict(uniform.named_parameters())[n]) for n, p in convs)


def test_an_unknown_norm_init_is_named() -> None:
    with pytest.raises(ValueError, match="norm_init='zeros': must be one of ones, uniform"):
        Conv4(1, 5, 28, norm_init="zeros")
