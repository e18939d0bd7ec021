"""SNAIL: a simple neural attentive meta-learner, few-shot classification (memory-based meta-learning).

The model is an embedding network. SNAIL adapts through what it reads, not through its weights: for each
query it reads the sequence of the N·K support pairs (embedding concatenated with the one-hot label, in the
episode's support order) followed by the query with a zero label vector, and its output at the last
position is the query's N class logits. Meta-training minimises the query cross-entropy, backpropagating
into the sequence network and the embedding.

The sequence network (metalearn/models/snail.py) is the paper's Omniglot architecture: causal
temporal-convolution and attention blocks.

Sizes. `setup(tasks)` builds the sequence network from the embedding size (probing the model), the way N
and the sequence length T = N·K + 1 of the training episodes. N is fixed by the label vector and the N
outputs: another way at test raises a ValueError. Another shot only changes the sequence length, which the
causal convolutions and attention take as it comes (T only sets the TCBlocks' depth): to evaluate a
checkpoint at another shot, keep the training shape in `dataset.train_k_shot`.

All queries of a task share the support prefix, so they are read in one pass of length N·K + Q, each
query at position N·K reading the support and itself only: the same as Q separate sequences of length
N·K + 1, without recomputing the support positions Q times.

"Before adaptation" metrics are `MetricLearner`'s: chance, the uniform logits of a classifier that has read
nothing of the task (loss log N, accuracy of argmax over equal logits, 1/N on balanced query sets). Labels
are assigned to classes at random per episode, so the network reading a query without its support could
do no better in expectation.

References:
    Mishra, N., Rohaninejad, M., Chen, X. and Abbeel, P. (2018). A Simple Neural Attentive Meta-Learner.
    ICLR. https://arxiv.org/abs/1707.03141
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.functional import Params
from metalearn.algorithms.metric import MetricLearner, n_way_of
from metalearn.models.snail import PAPER_ATTENTION, PAPER_TC_FILTERS, SNAILNetwork, block_sizes
from metalearn.objectives import Objective
from metalearn.tasks import TaskBatch, TaskSampler, probe


class SNAIL(MetricLearner[TaskBatch]):
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
        embedding = probe(self.model, tasks).flatten(1)
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
