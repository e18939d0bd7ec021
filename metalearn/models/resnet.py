"""ResNet-12, the backbone of TADAM (Oreshkin et al., 2018) and MetaOptNet (Lee et al., 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metalearn.checks import one_of, positive_int
from metalearn.models.norm import NORMS, norm_layer

POOLS = ("avg", "flatten")


class ResidualBlock(nn.Module):
    """Three 3x3 conv-norm-LeakyReLU(0.1) layers with a 1x1 projection shortcut, then 2x2 max-pooling."""

    def __init__(self, in_channels: int, channels: int, norm: str, norm_steps: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                       norm_layer(norm, channels, norm_steps)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False),
                                      norm_layer(norm, channels, norm_steps))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """Four residual blocks (64-160-320-640 channels by default) and an optional linear head.

    Args:
        in_channels: image channels.
        out_features: classes of the linear head; None for an embedding network.
        image_size: side of the square input images (to size the head).
        channels: output channels of the four blocks.
        norm: batch, batch_running, batch_per_step, group or none (see `metalearn.models.norm`).
        pool: avg (global average pooling, a 640-d embedding) or flatten (keep the spatial map).
        norm_steps: inner steps with their own normalisation weights (norm=batch_per_step only).
    """

    def __init__(
        self, in_channels: int, out_features: int | None, image_size: int,
        channels: Sequence[int] = (64, 160, 320, 640), norm: str = "batch_running", pool: str = "avg",
        norm_steps: int = 1,
    ) -> None:
        super().__init__()
        one_of("norm", norm, NORMS)
        one_of("pool", pool, POOLS)
        positive_int("image_size", image_size)
        blocks: list[nn.Module] = []
        previous = positive_int("in_channels", in_channels)
        for i, width in enumerate(channels):
            blocks.append(ResidualBlock(previous, positive_int(f"channels[{i}]", width), norm, norm_steps))
            previous = width
        reduce: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if pool == "avg" else []
        self.features = nn.Sequential(*blocks, *reduce, nn.Flatten())
        with torch.no_grad():
            self.embedding_size = self.features.eval()(torch.zeros(2, in_channels, image_size, image_size)).shape[1]
        self.features.train()
        self.head = (nn.Linear(self.embedding_size, positive_int("out_features", out_features))
                     if out_features is not None else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
