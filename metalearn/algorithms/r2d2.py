"""R2-D2 (Bertinetto et al., 2019, "Meta-learning with differentiable closed-form solvers").

Each task is learned by ridge regression from the embedded support set to its one-hot labels, solved in
closed form; the query embeddings are classified by the regression's outputs, scaled and shifted by
meta-learned scalars. The solution is differentiable, so the query loss trains the embedding network and
the regulariser through the solver.

With n support examples of d features (X: [n, d], one-hot targets Y: [n, N]) the ridge solution is

    W = (XᵀX + λ I_d)⁻¹ XᵀY = Xᵀ (XXᵀ + λ I_n)⁻¹ Y

where the second form, by the Woodbury identity, solves an n x n system instead of a d x d one: the
few-shot case (n = N·K examples against hundreds or thousands of features) is what makes it cheap.
`ridge_regression` uses whichever system is smaller.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.functional import Params
from metalearn.algorithms.metric import MetricLearner
from metalearn.checks import positive_float
from metalearn.objectives import Objective
from metalearn.tasks import TaskBatch


def ridge_regression(x: Tensor, y: Tensor, reg: Tensor | float) -> Tensor:
    """The ridge solution W [..., d, m] of `x` [..., n, d] onto `y` [..., n, m] with regulariser `reg` > 0:
    argmin_W |xW - y|² + reg |W|², through the n x n system when n <= d (Woodbury), else the d x d one."""
    n, d = x.shape[-2:]
    xt = x.transpose(-1, -2)
    if n <= d:
        gram = x @ xt + reg * torch.eye(n, dtype=x.dtype, device=x.device)
        return xt @ torch.linalg.solve(gram, y)
    gram = xt @ x + reg * torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram, xt @ y)


class R2D2(MetricLearner[TaskBatch]):
    """Ridge regression on the support embeddings as the base learner.

    Args:
        model: the embedding network; its outputs, flattened, are the features.
        objective: must be classification.
        reg: the ridge regulariser λ at the start; meta-learned (as log λ, so it stays positive) when
            `learn_reg`.
        learn_reg: meta-learn λ (the paper does).
        scale: α, the scale of the regression outputs that become logits, at the start; always
            meta-learned, as in the paper.
        bias: β, added to every logit, meta-learned as in the paper. A shift shared by all classes
            leaves the softmax and the cross-entropy unchanged, so β receives no gradient under this
            loss; it is kept for the paper's output layer α·xW + β.
        train_pass: see `MetricLearner`.
    """

    needs_classes_because: ClassVar[str] = "it regresses the one-hot labels of the support set"

    def __init__(self, model: nn.Module, objective: Objective, reg: float = 1.0, learn_reg: bool = True,
                 scale: float = 1.0, bias: float = 0.0, train_pass: str = "per_set") -> None:
        super().__init__(model, objective, train_pass)
        log_reg = torch.tensor(math.log(positive_float("reg", reg)))
        if learn_reg:
            self.log_reg = nn.Parameter(log_reg)
        else:
            self.register_buffer("log_reg", log_reg)
        self.scale = nn.Parameter(torch.tensor(positive_float("scale", scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    @property
    def reg(self) -> Tensor:
        """The ridge regulariser λ."""
        return self.log_reg.exp()

    def fit(self, support: Tensor, support_y: Tensor, n_way: int) -> Params:
        """{"weights": the ridge solution [T, d, n_way] from the flattened support embeddings to one-hot labels}."""
        targets = F.one_hot(support_y, n_way).to(support.dtype)
        return {"weights": ridge_regression(support.flatten(2), targets, self.reg.to(support.dtype))}

    def classify(self, state: Params, query: Tensor) -> Tensor:
        """α · (query features @ W) + β: logits [T, Q, n_way]."""
        return self.scale * (query.flatten(2) @ state["weights"]) + self.bias
