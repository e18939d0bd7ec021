"""Conv-4: the four-block convolutional network of MAML (Finn et al., 2017) and Prototypical Networks
(Snell et al., 2017), and with `pool_blocks=2, flatten=False` the feature-map embedding of Relation
Networks (Sung et al., 2018)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metalearn.checks import non_negative_int, one_of, positive_int
from metalearn.models.norm import NORMS, norm_layer

DOWNSAMPLES = ("maxpool", "stride")
NORM_INITS = ("ones", "uniform")


class Conv4(nn.Module):
    """Blocks of 3x3 convolution, normalisation, ReLU and 2x downsampling; then a linear head.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for colour images).
        out_features: classes of the linear head; None for an embedding network (no head).
        image_size: side of the square input images (to size the head).
        hidden: filters per convolution (64 for Omniglot; MAML uses 32 on mini-ImageNet).
        blocks: number of conv blocks.
        norm: batch, batch_running, batch_per_step, group or none (see `metalearn.models.norm`).
        downsample: maxpool (2x2 max-pooling after each downsampling block) or stride (stride-2
            convolutions, MAML's Omniglot network).
        norm_steps: inner steps with their own normalisation weights (norm=batch_per_step only).
        pool_blocks: how many of the first blocks downsample; the others keep the resolution (Relation
            Networks downsample in the first two of four, keeping a feature map for the relation module).
            None: every block.
        flatten: return flat embeddings [n, C * H * W]; False returns feature maps [n, C, H, W] (for
            algorithms that compare maps), which leaves no room for a head (out_features must be None).
        channels_last: keep the convolution weights and activations in the channels-last (NHWC) memory
            layout, which oneDNN's CPU convolutions run faster on for wide, pooled layers (ProtoNet's
            Conv-4: docs/performance.md). The values computed are the same up to rounding.
        norm_init: the normalisation layers' initial scales: ones (PyTorch's default since 1.0), or
            uniform on [0, 1), PyTorch's BatchNorm default before 1.0 (2018), which the published code of
            Prototypical and Relation Networks ran with.

    Attributes:
        feature_shape: the shape of one image's features (before the head).
        embedding_size: their number of entries.
    """

    def __init__(
        self, in_channels: int, out_features: int | None, image_size: int, hidden: int = 64, blocks: int = 4,
        norm: str = "batch", downsample: str = "maxpool", norm_steps: int = 1, pool_blocks: int | None = None,
        flatten: bool = True, channels_last: bool = False, norm_init: str = "ones",
    ) -> None:
        super().__init__()
        one_of("norm", norm, NORMS)
        one_of("norm_init", norm_init, NORM_INITS)
        one_of("downsample", downsample, DOWNSAMPLES)
        positive_int("image_size", image_size)
        positive_int("blocks", blocks)
        if pool_blocks is None:
            pool_blocks = blocks
        elif non_negative_int("pool_blocks", pool_blocks) > blocks:
            raise ValueError(f"pool_blocks={pool_blocks}: must be at most blocks={blocks}")
        if not flatten and out_features is not None:
            raise ValueError(f"out_features={out_features}: a head needs flat features; use out_features=null "
                             "with flatten=false")
        layers: list[nn.Module] = []
        channels = positive_int("in_channels", in_channels)
        for block in range(blocks):
            pools = block < pool_blocks
            stride = 2 if downsample == "stride" and pools else 1
            layers += [nn.Conv2d(channels, positive_int("hidden", hidden), 3, stride=stride, padding=1),
                       norm_layer(norm, hidden, norm_steps), nn.ReLU()]
            if downsample == "maxpool" and pools:
                layers.append(nn.MaxPool2d(2))
            channels = hidden
        self.features = nn.Sequential(*layers, *([nn.Flatten()] if flatten else []))
        with torch.no_grad():
            probe = self.features.eval()(torch.zeros(2, in_channels, image_size, image_size))
        self.feature_shape: tuple[int, ...] = tuple(probe.shape[1:])
        self.embedding_size = math.prod(self.feature_shape)
        self.features.train()
        self.head = (nn.Linear(self.embedding_size, positive_int("out_features", out_features))
                     if out_features is not None else nn.Identity())
        if norm_init == "uniform":
            for module in self.features.modules():
                scale = getattr(module, "weight", None)
                if isinstance(scale, nn.Parameter) and not isinstance(module, nn.Conv2d):
                    nn.init.uniform_(scale)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # documented, not in the stubs

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.features(x))
