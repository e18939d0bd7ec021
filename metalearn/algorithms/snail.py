"""SNAIL: a simple neural attentive meta-learner, few-shot classification (memory-based meta-learning).

The model is an embedding network. SNAIL adapts through what it reads, not through its weights: for each
query it reads the sequence of the N·K support pairs (embedding concatenated with the one-hot label, in the
episode's support order) followed by the query with a zero label vector, and its output at the last
position is the query's N class logits. Meta-training minimises the query cross-entropy, backpropagating
into the sequence network and the embedding.

The sequence network (the paper's Omniglot architecture, its appendix) alternates causal attention and
temporal-convolution blocks: AttentionBlock(64, 32), TCBlock(T, 128), AttentionBlock(256, 128),
TCBlock(T, 128), AttentionBlock(512, 256), then a linear map (the paper's 1x1 convolution) to N logits.
Every block concatenates its output to its input. A DenseBlock is a causal dilated convolution of kernel 2
with the gated activation tanh(x_f)·sigmoid(x_g); a TCBlock stacks ceil(log2 T) of them with dilations
1, 2, 4, ..., so that the last position sees all T positions (the paper's pseudo-code, as we read it,
starts at 2^1: even dilations alone never mix neighbouring positions). An AttentionBlock is single-head
causal key/query/value attention, softmax over the positions up to its own, logits scaled by
1/sqrt(key size); its keys have no bias, which would only add a constant to each row of logits.

Sizes. `setup(tasks)` builds the sequence network from the embedding size (probing the model), the way N
and the sequence length T = N·K + 1 of the training episodes. N is fixed by the label vector and the N
outputs: another way at test raises a ValueError. Another shot only changes the sequence length, which the
causal convolutions and attention take as it comes (T only sets the TCBlocks' depth): to evaluate a
checkpoint at another shot, keep the training shape in `dataset.train_k_shot`.

All queries of a task share the support prefix, so they are read in one pass of length N·K + Q: the support
positions form an ordinary causal sequence, and each query sits at position N·K reading the support and
itself only (`prefix` below). This equals reading Q separate sequences of length N·K + 1, without
recomputing the support positions Q times.

"Before adaptation" metrics are `MetricLearner`'s: chance, the uniform logits of a classifier that has read
nothing of the task (loss log N, accuracy of argmax over equal logits, 1/N on balanced query sets). Labels
are assigned to classes at random per episode, so the network reading a query without its support could
do no better in expectation.

References:
    Mishra, N., Rohaninejad, M., Chen, X. and Abbeel, P. (2018). A Simple Neural Attentive Meta-Learner.
    ICLR. https://arxiv.org/abs/1707.03141
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.functional import Params
from metalearn.algorithms.metric import MetricLearner, n_way_of, probe_features
from metalearn.checks import positive_int
from metalearn.objectives import Objective
from metalearn.tasks import TaskSampler

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


class SNAIL(MetricLearner):
    """SNAIL for few-shot classification; the model is the embedding network (without a head).

    Args:
        model: the embedding network; its outputs, flattened, are the embeddings.
        objective: must be classification.
        attention_sizes: (key size, value size) of each attention block; the paper's Omniglot sizes.
        tc_filters: filters of the TCBlocks between consecutive attention blocks.

    The sequence network is created by `setup(tasks)`, which must run before training or evaluating.
    """

    needs_classes_because: ClassVar[str] = "it reads labelled support examples and outputs class logits"

    def __init__(self, model: nn.Module, objective: Objective,
                 attention_sizes: Sequence[Sequence[int]] = PAPER_ATTENTION,
                 tc_filters: Sequence[int] = PAPER_TC_FILTERS) -> None:
        super().__init__(model, objective)
        self.attention_sizes, self.tc_filters = block_sizes(attention_sizes, tc_filters)
        self.n_way = 0
        self.snail: SNAILNetwork | None = None

    def setup(self, tasks: TaskSampler) -> None:
        """Create the sequence network for the embedding size, the way and the training episodes' length."""
        embedding = probe_features(self.model, tasks).flatten(1)
        generator = torch.Generator().manual_seed(0)
        train, val = tasks.sample(1, "train", generator), tasks.sample(1, "val", generator)
        n_way, eval_way = n_way_of(train.support_y), n_way_of(val.support_y)
        if n_way != eval_way:
            raise ValueError(f"SNAIL reads {n_way}-way one-hot labels and outputs {n_way} logits as trained, so it "
                             f"cannot evaluate {eval_way}-way episodes: set dataset.n_way and dataset.train_n_way "
                             "to the same way")
        self.n_way = n_way
        self.snail = SNAILNetwork(embedding.shape[1] + n_way, n_way, train.support_y.shape[1] + 1,
                                  self.attention_sizes, self.tc_filters)
        self.snail.to(device=embedding.device, dtype=embedding.dtype)

    def _network(self) -> SNAILNetwork:
        if self.snail is None:
            raise RuntimeError("SNAIL creates its sequence network in setup(tasks), from the embedding size and the "
                               "way; call setup before training or evaluating")
        return self.snail

    def fit(self, support: Tensor, support_y: Tensor, n_way: int) -> Params:
        """{"support": the support part of the sequence [T, n, d + N], embeddings then one-hot labels}."""
        self._network()
        if n_way != self.n_way:
            raise ValueError(f"SNAIL was built for {self.n_way}-way tasks (its one-hot labels and its {self.n_way} "
                             f"outputs fix the number of classes), but these are {n_way}-way: set dataset.n_way="
                             f"{self.n_way}")
        labels = F.one_hot(support_y, n_way).to(support.dtype)
        return {"support": torch.cat([support.flatten(2), labels], dim=-1)}

    def classify(self, state: Params, query: Tensor) -> Tensor:
        """Logits [T, Q, N]: each query read after the whole support sequence, with a zero label vector."""
        support, query = state["support"], query.flatten(2)
        unlabelled = torch.cat([query, query.new_zeros(*query.shape[:2], self.n_way)], dim=-1)
        sequence = torch.cat([support, unlabelled], dim=1)
        return self._network()(sequence, prefix=support.shape[1])[:, support.shape[1]:]
