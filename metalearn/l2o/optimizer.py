"""The coordinate-wise LSTM optimizer of "Learning to learn by gradient descent by gradient descent".

An optimizer here is an update rule: `rule(grad, state) -> (update, new_state)`, and the optimizee takes
θ ← θ + update. The LSTM optimizer m(∇; φ) sees one coordinate of one parameter at a time, with the same
weights φ for every coordinate of every parameter (Section 2.1), so all coordinates form one batch.

References:
    Andrychowicz, Denil, Gómez, Hoffman, Pfau, Schaul, Shillingford and de Freitas (2016). Learning to
    learn by gradient descent by gradient descent. NeurIPS. https://arxiv.org/abs/1606.04474
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.checkpoint import CheckpointError, load_checkpoint

# The LSTM's (h, c), each [layers, coordinates, hidden].
LSTMState = tuple[Tensor, Tensor]


class UpdateRule(Protocol):
    """An optimizer in functional form: a pure function of the gradient and its own state, so that an
    unrolled optimisation (`metalearn.l2o.unroll`) treats learned and hand-designed optimizers alike."""

    def initial_state(self, n_coordinates: int, dtype: torch.dtype | None = None) -> Any:
        """The state before the first step, for `n_coordinates` coordinates."""

    def __call__(self, grad: Tensor, state: Any) -> tuple[Tensor, Any]:
        """The update of each coordinate of `grad` [n] (added to the parameters) and the new state."""


def preprocess(grad: Tensor, p: float = 10.0) -> Tensor:
    """The paper's gradient preprocessing (Appendix A): each coordinate ∇ becomes two inputs,
    (log|∇| / p, sign ∇) if |∇| ≥ e^−p and (−1, e^p ∇) otherwise.

    The log separates the gradient's magnitude from its sign, so inputs of very different scales stay of
    order one; the second branch keeps tiny gradients from sending log|∇| to −∞.

    Args:
        grad: gradients of any shape.
        p: the cut-off exponent (p > 0).

    Returns:
        [..., 2], the two inputs of every coordinate.
    """
    if not p > 0:
        raise ValueError(f"preprocess_p={p!r}: must be positive")
    magnitude = grad.abs()
    large = magnitude >= math.exp(-p)
    # The clamp only affects the entries the `where` discards; it keeps log finite (and its gradient
    # free of NaNs) there.
    log_part = torch.where(large, magnitude.clamp_min(math.exp(-p)).log() / p, torch.full_like(grad, -1.0))
    sign_part = torch.where(large, grad.sign(), grad * math.exp(p))
    return torch.stack([log_part, sign_part], dim=-1)


class LSTMOptimizer(nn.Module):
    """The coordinate-wise two-layer LSTM optimizer m(∇_t, h_t; φ) of Andrychowicz et al. (2016).

    Every coordinate is one row of a batch through the same LSTM, so the weights are shared across all
    coordinates of all parameters and the optimizer is invariant to their order (Section 2.1). A linear
    layer maps the last hidden state to one value, scaled by `output_scale`: the update g_t, and the
    optimizee takes θ_{t+1} = θ_t + g_t (Section 2).

    Args:
        hidden: hidden units per LSTM layer (20 in the paper).
        layers: stacked LSTM layers (2 in the paper).
        preprocess: feed the preprocessed gradient (two inputs, Appendix A) rather than the raw one.
        preprocess_p: the exponent p of the preprocessing.
        output_scale: the factor on the output layer (0.1 in the paper).
    """

    def __init__(self, hidden: int = 20, layers: int = 2, preprocess: bool = True, preprocess_p: float = 10.0,
                 output_scale: float = 0.1) -> None:
        super().__init__()
        if hidden < 1 or layers < 1:
            raise ValueError(f"hidden={hidden}, layers={layers}: both must be at least 1")
        if preprocess and not preprocess_p > 0:
            raise ValueError(f"preprocess_p={preprocess_p!r}: must be positive")
        self.hidden = hidden
        self.layers = layers
        self.preprocess = preprocess
        self.preprocess_p = preprocess_p
        self.output_scale = output_scale
        # One step of a multi-layer nn.LSTM over a length-1 sequence: one fused call for all layers.
        self.lstm = nn.LSTM(2 if preprocess else 1, hidden, num_layers=layers)
        self.output = nn.Linear(hidden, 1)

    def initial_state(self, n_coordinates: int, dtype: torch.dtype | None = None) -> LSTMState:
        """Zero hidden and cell states for `n_coordinates` coordinates (of the weights' dtype by default)."""
        weight = self.output.weight
        zeros = torch.zeros(self.layers, n_coordinates, self.hidden, dtype=dtype or weight.dtype,
                            device=weight.device)
        return zeros, zeros.clone()

    def forward(self, grad: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        """One step for every coordinate at once.

        Args:
            grad: the optimizee's gradient, flat [n].
            state: the LSTM state of the n coordinates (`initial_state(n)` before the first step).

        Returns:
            The update [n] (to be added to the parameters) and the new state.
        """
        if grad.dim() != 1:
            raise ValueError(f"grad has shape {list(grad.shape)}: expected a flat vector [n]")
        if grad.dtype != self.output.weight.dtype:
            raise ValueError(f"grad is {grad.dtype} but the optimizer's weights are {self.output.weight.dtype}: "
                             "convert one of them (e.g. `.double()`)")
        x = self._inputs(grad)
        out, (h, c) = self.lstm(x.unsqueeze(0), state)
        update = self.output(out[0]).squeeze(-1) * self.output_scale
        return update, (h, c)

    def _inputs(self, grad: Tensor) -> Tensor:
        return preprocess(grad, self.preprocess_p) if self.preprocess else grad.unsqueeze(-1)

    def step_unfused(self, grad: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        """`forward` written with linear layers and elementwise gates instead of the fused LSTM kernel,
        which `torch.func.vmap` cannot batch: the same update and state, for a learned optimizer inside a
        vmapped inner loop (MAML's `inner_optimizer`). Slower than `forward` without gradients."""
        h, c = state
        x = self._inputs(grad)
        hs, cs = [], []
        for layer in range(self.layers):
            gates = (F.linear(x, getattr(self.lstm, f"weight_ih_l{layer}"), getattr(self.lstm, f"bias_ih_l{layer}"))
                     + F.linear(h[layer], getattr(self.lstm, f"weight_hh_l{layer}"),
                                getattr(self.lstm, f"bias_hh_l{layer}")))
            i, f, g, o = gates.chunk(4, dim=-1)  # nn.LSTM's gate order
            cell = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(cell)
            hs.append(x)
            cs.append(cell)
        update = self.output(x).squeeze(-1) * self.output_scale
        return update, (torch.stack(hs), torch.stack(cs))


def load_update_rule(rule: nn.Module, path: Path) -> None:
    """Load the weights of a learned optimizer trained by algorithm=l2o (its `model.*` entries) into
    `rule`; a run directory means its best checkpoint."""
    file = path / "checkpoints" / "best.pt" if path.is_dir() else path
    try:
        state = load_checkpoint(file, key="inner_optimizer_checkpoint")["algorithm"]
    except CheckpointError as ex:
        raise ValueError(str(ex)) from ex
    weights = {name.removeprefix("model."): value for name, value in state.items() if name.startswith("model.")}
    try:
        rule.load_state_dict(weights)
    except RuntimeError as ex:
        first = str(ex).strip().splitlines()[0]
        raise ValueError(f"inner_optimizer_checkpoint={str(path)!r}: not a learned optimizer of this shape "
                         f"({first})") from ex
