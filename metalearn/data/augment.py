"""Random image augmentation for training episodes, one affine resampling per image.

Every transform here (rotation, shear, scale, translation, horizontal flip, and the random crop of a
zero-padded image) is an affine map of the image plane, so each image gets one random 2x3 matrix and
the whole meta-batch is resampled by a single `grid_sample` call. Randomness comes only from the
explicit generator, so augmented episodes are reproducible and resume exactly.

The `affine` preset follows the distortions of Koch, Zemel and Salakhutdinov (2015), "Siamese Neural
Networks for One-shot Image Recognition" (rotation within ±10 degrees, shear within ±0.3, scale in
[0.8, 1.2], translation within ±2 pixels, each applied with probability 1/2). The `flip_crop` preset
is the horizontal flip and random crop of an image padded by 4 pixels (32x32) or 8 (84x84) used to
train ResNet-12 embeddings on CIFAR-FS and mini-ImageNet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.checks import interval, non_negative_float, one_of

PADDING_MODES = ("zeros", "border", "reflection")


def affine_matrices(angle: Tensor, shear: Tensor, zoom: Tensor, shift: Tensor, mirror: Tensor,
                    height: int, width: int) -> Tensor:
    """`affine_grid` matrices [n, 2, 3] (normalised coordinates, `align_corners=False`) that move image
    content by: a left-right mirror where `mirror` [n] is set, then zoom [n] about the centre, shear
    [n, 2] (horizontal, vertical factor), rotation by `angle` [n] (degrees, clockwise on screen since
    rows run downwards), and a shift [n, 2] of (right, down) pixels."""
    n = angle.shape[0]
    radians = angle * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    ones = torch.ones(n)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.stack([torch.stack([ones, shear[:, 0]], -1), torch.stack([shear[:, 1], ones], -1)], -2)
    flip = torch.where(mirror, -1.0, 1.0)
    # Forward map in pixel units about the image centre: x' = R · Shear · zoom · Mirror · x + shift.
    forward = (rotation @ shearing) * zoom.view(n, 1, 1) * torch.stack([flip, ones], -1).view(n, 1, 2)
    # To normalised units (the image spans 2 units across its width and its height): D · A · D⁻¹.
    unit = torch.tensor([2.0 / width, 2.0 / height])
    forward = forward * unit.view(1, 2, 1) / unit.view(1, 1, 2)
    offset = (shift * unit).unsqueeze(-1)
    # affine_grid wants the inverse map, from output to input coordinates.
    inverse = torch.linalg.inv(forward)
    return torch.cat([inverse, -(inverse @ offset)], dim=-1)


def warp(images: Tensor, theta: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Resample float images [n, C, H, W] through `affine_grid` matrices `theta` [n, 2, 3] (bilinear)."""
    grid = F.affine_grid(theta.to(device=images.device, dtype=images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


class Augment:
    """Random affine augmentation of float images [..., C, H, W].

    Each image gets its own transform. Rotation, shear, scale and translation are each applied with
    probability `p` (and otherwise left out); the flip with probability 1/2 when `flip` is set; the
    crop always when `crop_padding` > 0. With every option at its default the images pass unchanged.

    Args:
        degrees: rotation angle drawn uniformly from [-degrees, degrees].
        shear: horizontal and vertical shear factors, each drawn from [-shear, shear].
        scale: zoom factor drawn from [scale[0], scale[1]] (above 1 enlarges the content).
        translate: shift in pixels, horizontally and vertically, drawn from [-translate, translate].
        p: probability with which each of rotation, shear, scale and translation is applied.
        flip: mirror left-right with probability 1/2.
        crop_padding: random crop of the image padded by this many pixels on every side: an integer
            shift of up to `crop_padding` pixels in each direction, with `padding_mode` filling the
            uncovered border.
        padding_mode: how pixels from outside the image are filled: `zeros`, `border` (repeat the edge)
            or `reflection`.
    """

    def __init__(self, degrees: float = 0.0, shear: float = 0.0, scale: Sequence[float] = (1.0, 1.0),
                 translate: float = 0.0, p: float = 1.0, flip: bool = False, crop_padding: int = 0,
                 padding_mode: str = "zeros") -> None:
        self.degrees = non_negative_float("augment.degrees", degrees)
        self.shear = non_negative_float("augment.shear", shear)
        self.scale = interval("augment.scale", scale)
        if self.scale[0] <= 0:
            raise ValueError(f"augment.scale={list(scale)!r}: the zoom factors must be positive")
        self.translate = non_negative_float("augment.translate", translate)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment.p={p!r}: must be a probability in [0, 1]")
        self.p = float(p)
        self.flip = bool(flip)
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"augment.crop_padding={crop_padding!r}: must be a non-negative integer")
        self.crop_padding = crop_padding
        self.padding_mode = one_of("augment.padding_mode", padding_mode, PADDING_MODES)

    @property
    def active(self) -> bool:
        """Whether any transform is switched on."""
        affine = self.degrees > 0 or self.shear > 0 or self.scale != (1.0, 1.0) or self.translate > 0
        return (affine and self.p > 0) or self.flip or self.crop_padding > 0

    def matrices(self, n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
        """`n` random transforms as `affine_grid` matrices (see `affine_matrices`)."""

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            return low + (high - low) * torch.rand(n, *shape, generator=generator)

        def sometimes(values: Tensor, neutral: float) -> Tensor:
            keep = (torch.rand(n, generator=generator) < self.p).view(-1, *([1] * (values.dim() - 1)))
            return torch.where(keep, values, torch.full_like(values, neutral))

        angle = sometimes(uniform(-self.degrees, self.degrees), 0.0)
        shear = sometimes(uniform(-self.shear, self.shear, 2), 0.0)
        zoom = sometimes(uniform(*self.scale), 1.0)
        shift = sometimes(uniform(-self.translate, self.translate, 2), 0.0)
        if self.crop_padding:
            shift = shift + torch.randint(-self.crop_padding, self.crop_padding + 1, (n, 2), generator=generator)
        mirror = torch.zeros(n, dtype=torch.bool)
        if self.flip:
            mirror = torch.rand(n, generator=generator) < 0.5
        return affine_matrices(angle, shear, zoom, shift, mirror, height, width)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augmented copies of `images` [..., C, H, W] (float), each with its own random transform."""
        if not self.active:
            return images
        *lead, c, h, w = images.shape
        flat = images.reshape(-1, c, h, w)
        out = warp(flat, self.matrices(flat.shape[0], h, w, generator), self.padding_mode)
        return out.reshape(*lead, c, h, w)

    def __repr__(self) -> str:
        return (f"Augment(degrees={self.degrees}, shear={self.shear}, scale={self.scale}, "
                f"translate={self.translate}, p={self.p}, flip={self.flip}, "
                f"crop_padding={self.crop_padding}, padding_mode={self.padding_mode!r})")
