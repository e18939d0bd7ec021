"""Matching Networks: classify a query by attention over the labelled support set.

The model is an embedding network. A query x gets the attention a(x, x_i) = softmax_i(scale * cos(f(x), g(x_i)))
over the support examples x_i, and class k the probability P(k | x) = sum of a(x, x_i) over class k's
examples; meta-training minimises -log P(y | x) on the query set, backpropagating into the embedding.
With scale 1 (the paper's) and f = g = the embedding network, this is the paper's basic model.

Full context embeddings (the paper's "FCE", its appendix A) make both embeddings depend on the whole
support set S. g is a bidirectional LSTM read over the support embeddings g'(x_i) in the episode's order,
with a skip connection: g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i). f is an LSTM that reads K times over
g(S) with content-based attention: at step k, r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i), then
(h^_k, c_k) = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1}) and h_k = h^_k + f'(x); f(x, S) = h_K.

The paper's LSTM takes the concatenation [h_{k-1}, r_{k-1}] (2d entries) as its hidden state, yet its
output h^_k must have d entries to be added to f'(x). We read the concatenation as what the LSTM's gates
see: gates = W [f'(x); h_{k-1}; r_{k-1}] + b, whose recurrent weight on [h; r] is the same as a weight
on h plus one on r. So the attention LSTM is an LSTM cell with input [f'(x); r_{k-1}] (2d), hidden and
cell state of size d, and hidden state h_{k-1}. The state before the first step is the cell's zero state,
so h_0 = 0 + f'(x) by the skip connection (and c_0 = 0); r_0 already attends with h_0. This is also the
reading of Hariharan and Girshick's reference implementation (2017, low-shot-shrink-hallucinate).

References:
    Vinyals, O., Blundell, C., Lillicrap, T., Kavukcuoglu, K. and Wierstra, D. (2016). Matching Networks
    for One Shot Learning. NeurIPS. https://arxiv.org/abs/1606.04080
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.functional import Params
from metalearn.algorithms.metric import MetricLearner, class_members
from metalearn.checks import positive_int
from metalearn.objectives import Objective
from metalearn.tasks import TaskBatch, TaskSampler, probe


def attention_logits(queries: Tensor, support: Tensor, scale: Tensor) -> Tensor:
    """scale * cosine similarity [T, Q, n] of every query embedding [T, Q, d] to every support one [T, n, d]."""
    return scale * (F.normalize(queries, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2))


def class_log_probabilities(logits: Tensor, members: Tensor) -> Tensor:
    """log P(k | query) [T, Q, n_way] = log of the summed softmax attention over class k's support
    examples, computed as logsumexp of the log-attention over them (the other entries masked by -inf,
    so a confident attention gives an exact log-probability rather than log of a rounded sum).

    Args:
        logits: attention logits [T, Q, n] over the support set.
        members: one-hot class membership [T, n, n_way] of the support examples (`class_members`).
    """
    mask = torch.zeros(members.shape, dtype=logits.dtype, device=logits.device).masked_fill(members == 0, -torch.inf)
    return torch.logsumexp(logits.log_softmax(-1).unsqueeze(-1) + mask.unsqueeze(1), dim=2)


class MatchingNet(MetricLearner[TaskBatch]):
    """Matching Networks; the model is the embedding network (normally without a head).

    Args:
        model: the embedding network f' = g'; its outputs, flattened, are the embeddings.
        objective: must be classification (the loss is the log-likelihood of the attention's class).
        scale: attention logits are scale * cosine similarity; 1 is the paper's. Cosines lie in [-1, 1],
            so at 1 the attention is never sharp: a larger or learned scale trains faster.
        learn_scale: make `scale` a meta-parameter (its initial value is `scale`); otherwise fixed.
        fce: full context embeddings (the module docstring). Their LSTMs are sized by the embedding,
            so they are created by `setup(tasks)`, which must run before training or evaluation.
        fce_steps: K, the attention LSTM's reads over the support set (fce only). The paper does not
            give a value; 5 is the reference implementation's default.
        train_pass: `per_set` or `per_task`, how training steps embed a task under batch-statistics
            normalisation (see `MetricLearner`).

    Scores are class log-probabilities, so the base's cross-entropy is the paper's -log P(y | x).
    Metrics and batch-statistics normalisation: see `MetricLearner` and `embed_sets`.
    """

    needs_classes_because: ClassVar[str] = "it attends over labelled support examples and its loss is a log-likelihood"

    def __init__(self, model: nn.Module, objective: Objective, scale: float = 1.0, learn_scale: bool = False,
                 fce: bool = False, fce_steps: int = 5, train_pass: str = "per_set") -> None:
        super().__init__(model, objective, train_pass)
        self._register_scale(scale, learn_scale)
        self.fce = fce
        self.fce_steps = positive_int("fce_steps", fce_steps)
        self.support_lstm: nn.LSTM | None = None
        self.query_lstm: nn.LSTMCell | None = None

    def setup(self, tasks: TaskSampler) -> None:
        """With `fce`, create the LSTMs for the model's embedding size d: a bidirectional LSTM d -> d for
        g, and an LSTM cell with input [f'(x); r] (2d) and state d for f."""
        if not self.fce:
            return
        out = probe(self.model, tasks).flatten(1)
        d = out.shape[1]
        self.support_lstm = nn.LSTM(d, d, batch_first=True, bidirectional=True, device=out.device, dtype=out.dtype)
        self.query_lstm = nn.LSTMCell(2 * d, d, device=out.device, dtype=out.dtype)

    def _lstms(self) -> tuple[nn.LSTM, nn.LSTMCell]:
        if self.support_lstm is None or self.query_lstm is None:
            raise RuntimeError("MatchingNet with fce=True creates its LSTMs in setup(tasks), from the embedding "
                               "size; call setup before training or evaluating")
        return self.support_lstm, self.query_lstm

    def fit(self, support: Tensor, support_y: Tensor, n_way: int) -> Params:
        """{"support": g(x_i, S) [T, n, d], "members": one-hot labels [T, n, n_way]}; without fce g is the
        flattened embedding itself."""
        g = support.flatten(2)
        if self.fce:
            lstm, _ = self._lstms()
            both, _ = lstm(g)  # [T, n, 2d]: forward then backward hidden states
            forward, backward = both.chunk(2, dim=-1)
            g = forward + backward + g
        return {"support": g, "members": class_members(support_y, n_way)}

    def classify(self, state: Params, query: Tensor) -> Tensor:
        """Class log-probabilities [T, Q, n_way] of the flattened query embeddings."""
        g, f = state["support"], query.flatten(2)
        if self.fce:
            f = self.read(f, g)
        return class_log_probabilities(attention_logits(f, g, self.scale), state["members"])

    def read(self, queries: Tensor, support: Tensor) -> Tensor:
        """f(x, S) [T, Q, d]: the attention LSTM's K reads over g(S) [T, n, d] from f'(x) [T, Q, d]."""
        _, cell = self._lstms()
        tasks, n_queries, d = queries.shape
        inputs = queries.reshape(-1, d)
        h, c = queries, queries.new_zeros(tasks * n_queries, d)  # h_0 = 0 + f'(x); c_0 = 0
        for _ in range(self.fce_steps):
            attention = (h @ support.transpose(1, 2)).softmax(-1)  # dot-product attention, as the paper's
            readout = attention @ support
            hidden, c = cell(torch.cat([inputs, readout.reshape(-1, d)], dim=1), (h.reshape(-1, d), c))
            h = hidden.view(tasks, n_queries, d) + queries
        return h
