"""Multi-layer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metalearn.checks import one_of, positive_int

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """Fully connected network: `in_features` -> hidden_sizes... -> `out_features`.

    Args:
        in_features: size of each input vector.
        out_features: size of each output vector; None for an embedding network, whose output is the
            last hidden layer's activations (metric-based methods).
        hidden_sizes: widths of the hidden layers (the MAML sinusoid model is [40, 40]).
        activation: nonlinearity between layers, one of relu, tanh, gelu.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | None,
        hidden_sizes: Sequence[int] = (40, 40),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        positive_int("in_features", in_features)
        act = ACTIVATIONS[one_of("activation", activation, tuple(ACTIVATIONS))]
        layers: list[nn.Module] = []
        width = in_features
        for i, hidden in enumerate(hidden_sizes):
            layers += [nn.Linear(width, positive_int(f"hidden_sizes[{i}]", hidden)), act()]
            width = hidden
        if out_features is not None:
            layers.append(nn.Linear(width, positive_int("out_features", out_features)))
        elif not hidden_sizes:
            raise ValueError("out_features=None: an embedding MLP needs at least one hidden layer (hidden_sizes)")
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
