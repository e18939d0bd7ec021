"""Tests of the MLP: layer sizes, the embedding mode without an output layer, argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metalearn.models.mlp import MLP


def test_layers_and_output_size() -> None:
    model = MLP(3, 2, hidden_sizes=(5, 4), activation="tanh")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 5), (5, 4), (4, 2)]
    assert model(torch.zeros(7, 3)).shape == (7, 2)


def test_embedding_mode_ends_with_the_last_hidden_activation() -> None:
    """out_features=None drops the output layer: the output is the last hidden layer after its ReLU."""
    torch.manual_seed(0)
    model = MLP(3, None, hidden_sizes=(5, 4))
    x = torch.randn(6, 3)
    first, second = (m for m in model.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(model(x), torch.relu(second(torch.relu(first(x)))))
    with pytest.raises(ValueError, match="out_features=None: an embedding MLP needs at least one hidden layer"):
        MLP(3, None, hidden_sizes=())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"out_features": 0}, "out_features=0: must be a positive integer"),
    ({"hidden_sizes": (4, 0)}, r"hidden_sizes\[1\]=0: must be a positive integer"),
    ({"activation": "sigmoid"}, "activation='sigmoid': must be one of relu, tanh, gelu"),
])
def test_argument_errors_name_the_argument(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"in_features": 1, "out_features": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        MLP(**arguments)  # type: ignore[arg-type]
