"""Normalisation layers, chosen explicitly by name, and per-step BatchNorm for inner-loop adaptation.

Modes (`model.norm`):
    batch: BatchNorm normalising with the statistics of the current batch only, at training and at
        test. This is MAML's transductive setting (Finn et al., 2017, and its reference code): no
        running statistics, so nothing leaks across tasks and the layer is safe under vmap.
    batch_running: standard BatchNorm; batch statistics while training, running averages at
        evaluation (the usual setting for ProtoNet-style embeddings and pre-trained baselines).
    batch_per_step: BatchNorm with a separate scale and shift for every inner-loop step and one for
        the adapted model's query pass, normalising with batch statistics; MAML++'s "per-step batch
        normalisation weights" (Antoniou et al., 2019, "How to train your MAML", ICLR). Meta-learning
        algorithms select the slot with `set_adaptation_step`; outside adaptation the final slot is used.
    group: GroupNorm with 4 channels per group (batch-independent).
    none: identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.checks import positive_int

NORMS = ("batch", "batch_running", "batch_per_step", "group", "none")


class PerStepBatchNorm2d(nn.Module):
    """BatchNorm over [N, C, H, W] with per-step affine weights and batch statistics.

    Slots 0..steps-1 serve inner steps 0..steps-1 (later steps, e.g. extra steps at evaluation, share
    the last of them); slot `steps` serves the adapted model's forward pass on the query set.

    Args:
        channels: feature channels.
        steps: inner steps with a slot of their own.
        eps: added to the variance.
    """

    def __init__(self, channels: int, steps: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.steps = positive_int("norm_steps", steps)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(steps + 1, channels))
        self.bias = nn.Parameter(torch.zeros(steps + 1, channels))
        self.slot = steps

    def set_step(self, step: int | None) -> None:
        """Use the slot of inner step `step`, or the final (query) slot when `step` is None."""
        self.slot = self.steps if step is None else min(step, self.steps - 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, None, None, self.weight[self.slot], self.bias[self.slot], training=True, eps=self.eps)


def set_adaptation_step(model: nn.Module, step: int | None) -> None:
    """Point every per-step layer of `model` at inner step `step` (None: the adapted model's query pass).

    Algorithms call this before each forward pass of an inner loop; models without per-step layers
    are unaffected.
    """
    for module in model.modules():
        if isinstance(module, PerStepBatchNorm2d):
            module.set_step(step)


def norm_layer(norm: str, channels: int, steps: int = 1) -> nn.Module:
    """The normalisation layer for mode `norm` (see the module docstring) over `channels` channels.

    Args:
        norm: one of NORMS.
        channels: feature channels.
        steps: inner steps with their own weights (batch_per_step only).
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if norm == "batch_running":
        return nn.BatchNorm2d(channels)
    if norm == "batch_per_step":
        return PerStepBatchNorm2d(channels, steps)
    if norm == "group":
        return nn.GroupNorm(max(1, channels // 4), channels)
    return nn.Identity()
