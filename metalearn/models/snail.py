"""SNAIL's sequence network (Mishra et al., 2018): causal temporal-convolution and attention blocks.

The paper's Omniglot architecture (its appendix) alternates causal attention and temporal-convolution
blocks: AttentionBlock(64, 32), TCBlock(T, 128), AttentionBlock(256, 128), TCBlock(T, 128),
AttentionBlock(512, 256), then a linear map (the paper's 1x1 convolution) to N logits. Every block
concatenates its output to its input. A DenseBlock is a causal dilated convolution of kernel 2 with the
gated activation tanh(x_f)·sigmoid(x_g); a TCBlock stacks ceil(log2 T) of them with dilations 1, 2, 4,
..., so that the last position sees all T positions (the paper's pseudo-code, as we read it, starts at
2^1: even dilations alone never mix neighbouring positions). An AttentionBlock is single-head causal
key/query/value attention, softmax over the positions up to its own, logits scaled by 1/sqrt(key
size); its keys have no bias, which would only add a constant to each row of logits.

`prefix`: all queries of a task share the support prefix, so they are read in one pass of length
N·K + Q: the support positions form an ordinary causal sequence, and each query sits at position N·K
reading the support and itself only.

References:
    Mishra, N., Rohaninejad, M., Chen, X. and Abbeel, P. (2018). A Simple Neural Attentive Meta-Learner.
    ICLR. https://arxiv.org/abs/1707.03141
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.checks import positive_int

PAPER_ATTENTION = ((64, 32), (256, 128), (512, 256))
PAPER_TC_FILTERS = (128, 128)


def times_of(length: int, prefix: int | None, device: torch.device) -> Tensor:
    """Time step [L] of each position of a layout whose first `prefix` positions are an ordinary sequence and
    whose later positions are parallel continuations of it, each at time `prefix` (None: all ordinary)."""
    times = torch.arange(length, device=device)
    return times if prefix is None else times.clamp(max=prefix)


def block_sizes(attention_sizes: Sequence[Sequence[int]],
                tc_filters: Sequence[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """The checked (key size, value size) pairs and TCBlock filters: one TCBlock between consecutive
    attention blocks."""
    pairs = []
    for i, sizes in enumerate(attention_sizes):
        if len(sizes) != 2:
            raise ValueError(f"attention_sizes[{i}]={list(sizes)}: must be a pair [key size, value size]")
        key_size, value_size = (positive_int(f"attention_sizes[{i}][{j}]", size) for j, size in enumerate(sizes))
        pairs.append((key_size, value_size))
    if not pairs or len(tc_filters) != len(pairs) - 1:
        raise ValueError(f"tc_filters={list(tc_filters)}: one TCBlock goes between consecutive attention blocks, so "
                         f"{max(len(pairs) - 1, 0)} are needed for {len(pairs)} attention blocks (at least one)")
    return pairs, [positive_int(f"tc_filters[{i}]", f) for i, f in enumerate(tc_filters)]


class DenseBlock(nn.Module):
    """Causal dilated convolution (kernel 2) with gated activation, its output concatenated to the input:
    [B, L, C] -> [B, L, C + filters], out[t] = tanh(f[t])·sigmoid(g[t]) with [f; g][t] = W0 x[t - d] + W1 x[t] + b
    (x before the start is zero). `conv` reads [x[t - d]; x[t]]: its weight is [W0, W1]."""

    def __init__(self, channels: int, dilation: int, filters: int) -> None:
        super().__init__()
        self.dilation = positive_int("dilation", dilation)
        self.conv = nn.Linear(2 * channels, 2 * positive_int("filters", filters))
        self.out_channels = channels + filters

    def forward(self, x: Tensor, prefix: int | None = None) -> Tensor:
        past = self.times_back(times_of(x.shape[1], prefix, x.device))
        earlier = F.pad(x, (0, 0, 1, 0))[:, past + 1]  # index 0 of the padded sequence is the zero before the start
        f, g = self.conv(torch.cat([earlier, x], dim=-1)).chunk(2, dim=-1)
        return torch.cat([x, torch.tanh(f) * torch.sigmoid(g)], dim=-1)

    def times_back(self, times: Tensor) -> Tensor:
        """Position of time t - d for each position (-1 before the start): the ordinary positions are at
        their own time, so a position's past is always among them."""
        return (times - self.dilation).clamp(min=-1)


class TCBlock(nn.Module):
    """ceil(log2 T) DenseBlocks with dilations 1, 2, 4, ...: the last of T positions sees all of them."""

    def __init__(self, channels: int, length: int, filters: int) -> None:
        super().__init__()
        layers: list[DenseBlock] = []
        for i in range(math.ceil(math.log2(positive_int("length", length)))):
            layers.append(DenseBlock(channels, 2**i, filters))
            channels = layers[-1].out_channels
        self.layers = nn.ModuleList(layers)
        self.out_channels = channels

    def forward(self, x: Tensor, prefix: int | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, prefix)
        return x


class AttentionBlock(nn.Module):
    """Single-head causal attention, its read concatenated to the input: [B, L, C] -> [B, L, C + value_size]."""

    def __init__(self, channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.key_size = positive_int("key_size", key_size)
        self.query = nn.Linear(channels, key_size)
        # No key bias: it would add q_t . b to every logit of row t, which the softmax ignores.
        self.key = nn.Linear(channels, key_size, bias=False)
        self.value = nn.Linear(channels, positive_int("value_size", value_size))
        self.out_channels = channels + value_size

    def forward(self, x: Tensor, prefix: int | None = None) -> Tensor:
        logits = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(self.key_size)
        reads = logits.masked_fill(~self.visible(x.shape[1], prefix, x.device), -math.inf).softmax(-1)
        return torch.cat([x, reads @ self.value(x)], dim=-1)

    @staticmethod
    def visible(length: int, prefix: int | None, device: torch.device) -> Tensor:
        """[L, L] bool: position i attends to j. Ordinary positions see those up to themselves; a
        continuation sees the ordinary positions and itself, not the other continuations."""
        i = torch.arange(length, device=device)
        earlier = i[None, :] <= i[:, None]
        if prefix is None:
            return earlier
        return earlier & ((i[None, :] < prefix) | (i[None, :] == i[:, None]))


class SNAILNetwork(nn.Module):
    """Attention, TC, attention, ..., attention blocks, then a linear map to `n_classes` per position.

    Args:
        in_features: input channels per position (embedding + one-hot label).
        n_classes: outputs per position.
        length: T, the sequence length that sets the TCBlocks' depth.
        attention_sizes: (key size, value size) of each attention block.
        tc_filters: filters of the TCBlock after each attention block but the last.
    """

    def __init__(self, in_features: int, n_classes: int, length: int, attention_sizes: Sequence[Sequence[int]],
                 tc_filters: Sequence[int]) -> None:
        super().__init__()
        pairs, filters = block_sizes(attention_sizes, tc_filters)
        blocks: list[AttentionBlock | TCBlock] = []
        channels = in_features
        for i, (key_size, value_size) in enumerate(pairs):
            if i > 0:
                blocks.append(TCBlock(channels, length, filters[i - 1]))
                channels = blocks[-1].out_channels
            blocks.append(AttentionBlock(channels, key_size, value_size))
            channels = blocks[-1].out_channels
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(channels, n_classes)

    def forward(self, x: Tensor, prefix: int | None = None) -> Tensor:
        """Outputs [B, L, n_classes] of sequences [B, L, in_features]; with `prefix`, positions from `prefix`
        on are parallel continuations of the first `prefix` positions (see `AttentionBlock.visible`)."""
        for block in self.blocks:
            x = block(x, prefix)
        return self.out(x)
