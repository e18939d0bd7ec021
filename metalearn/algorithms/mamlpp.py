"""MAML++: MAML with the stabilising changes of "How to train your MAML".

Each of the paper's changes is a switch:

- Multi-step loss (MSL, `multi_step_loss_steps`): for the first meta-steps the outer loss is a
  weighted sum of the query losses after every inner step, the weights annealed from uniform towards
  the final step; afterwards only the final step's loss counts.
- Learned per-layer per-step inner learning rates (LSLR, `learn_inner_lr`): one learning rate per
  parameter tensor and inner step, meta-learned with the initialisation.
- Derivative-order annealing (DA, `first_order_steps`): first-order meta-gradients for the first
  meta-steps, second order afterwards.
- Per-step BatchNorm weights are a model setting, not an algorithm one: `model.norm=batch_per_step`
  (metalearn.models.norm); MAML's inner loop already selects each step's slot. Per-step running
  statistics are not provided: the layer normalises with batch statistics (transductive), as MAML does.
- Cosine annealing of the meta-learning rate is the trainer's `scheduler=cosine`.

References:
    Antoniou, A., Edwards, H. and Storkey, A. (2019). How to train your MAML. ICLR.
    https://arxiv.org/abs/1810.09502
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metalearn.algorithms.functional import LearningRate, Params, forward_with
from metalearn.algorithms.maml import MAML
from metalearn.checks import non_negative_int
from metalearn.objectives import Objective

# The reference code's floor on each non-final MSL weight, as a fraction of the uniform weight 1/N.
MSL_FLOOR = 0.03


def multi_step_loss_weights(step: int, window: int, inner_steps: int) -> list[float]:
    """The MSL weight of the query loss after each inner step, at meta-step `step`.

    The schedule of the reference code (HowToTrainYourMAMLPytorch, `get_per_step_loss_importance_vector`)
    with its epochs counted in meta-steps: epoch / msl_epochs becomes step / window. The weights start
    uniform (1/N); each non-final weight falls by (step / window) / N, floored at 0.03 / N, and the final
    weight gains what they lose, (N - 1) (step / window) / N, capped at 1 - (N - 1) 0.03 / N. Floor and
    cap engage together (at step / window = 0.97), so the weights sum to 1 up to rounding. From `window`
    on only the final step counts.

    Args:
        step: the 0-based meta-step.
        window: meta-steps with the multi-step loss (0: never).
        inner_steps: N, the inner steps whose losses are weighted.

    Returns:
        N weights, the last for the final inner step.
    """
    if step >= window:
        return [0.0] * (inner_steps - 1) + [1.0]
    uniform, floor = 1.0 / inner_steps, MSL_FLOOR / inner_steps
    decay = step / window * uniform
    non_final = max(uniform - decay, floor)
    final = min(uniform + (inner_steps - 1) * decay, 1.0 - (inner_steps - 1) * floor)
    return [non_final] * (inner_steps - 1) + [final]


def rate_key(name: str) -> str:
    """The key of parameter `name`'s learning rates (module keys may not contain dots)."""
    return name.replace(".", "-")


class MAMLPlusPlus(MAML):
    """MAML++ (see the module docstring); with every switch off it is MAML.

    Args:
        model: the base model whose initialisation is meta-learned (`norm=batch_per_step` for the
            paper's per-step BatchNorm weights).
        objective: the task family's loss and metric.
        inner_lr: with `learn_inner_lr`, the initial value of every learned rate (the paper's 0.1).
        inner_steps: inner steps during meta-training (the paper's 5), also the number of learned rates
            per tensor.
        eval_inner_steps: inner steps at evaluation (the paper's 5); steps beyond `inner_steps` reuse
            the last learned rate, the only one that exists for them.
        multi_step_loss_steps: meta-steps trained on the annealed multi-step loss (the paper: 10 epochs
            of 500 meta-steps); 0 switches MSL off. Evaluation always scores the final step.
        first_order_steps: meta-steps with first-order meta-gradients before second order; 0: second
            order from the start.
        learn_inner_lr: learn one inner learning rate per parameter tensor and inner step (LSLR);
            false: the fixed `inner_lr`.
        **maml_args: MAML's other arguments; `first_order` gives first-order meta-gradients throughout,
            whatever `first_order_steps` says.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        eval_inner_steps: int | None = 5,
        multi_step_loss_steps: int = 5000,
        first_order_steps: int = 0,
        learn_inner_lr: bool = True,
        **maml_args: Any,
    ) -> None:
        super().__init__(model, objective, inner_lr=inner_lr, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, **maml_args)
        self.multi_step_loss_steps = non_negative_int("multi_step_loss_steps", multi_step_loss_steps)
        self.first_order_steps = non_negative_int("first_order_steps", first_order_steps)
        if not isinstance(learn_inner_lr, bool):
            raise ValueError(f"learn_inner_lr={learn_inner_lr!r}: must be true or false")
        self.learn_inner_lr = learn_inner_lr
        # Registered on the algorithm, so the meta-optimizer and the checkpoint cover them.
        self.inner_lrs = nn.ParameterDict({
            rate_key(name): nn.Parameter(torch.full((self.inner_steps,), self.inner_lr, dtype=p.dtype, device=p.device))
            for name, p in model.named_parameters()
        } if learn_inner_lr else {})
        # The user's setting; `first_order` itself is the current meta-step's choice (set_progress).
        self.always_first_order = self.first_order
        self.set_progress(0, 1)

    def set_progress(self, step: int, max_steps: int) -> None:
        """Take the MSL weights and the derivative order of meta-step `step` (from nothing else, so a
        resumed run follows the same schedule). Both windows are absolute meta-step counts, as in the
        paper, so `max_steps` is not used."""
        self.progress = non_negative_int("step", step)
        self.first_order = self.always_first_order or step < self.first_order_steps

    def loss_weights(self, inner_steps: int) -> list[float]:
        """The current MSL weights of the query losses after each of `inner_steps` inner steps."""
        return multi_step_loss_weights(self.progress, self.multi_step_loss_steps, inner_steps)

    def step_size(self, step: int) -> LearningRate:
        """The learned rates of inner step `step` per parameter name (the last ones beyond training's
        steps), or the fixed `inner_lr`."""
        if not self.learn_inner_lr:
            return self.inner_lr
        slot = min(step, self.inner_steps - 1)
        return {name: self.inner_lrs[rate_key(name)][slot] for name, _ in self.model.named_parameters()}

    def outer_loss(self, trajectory: list[Params], buffers: Params, query_x: Tensor,
                   query_y: Tensor) -> tuple[Tensor, Tensor]:
        """The MSL-weighted sum of the query losses after each inner step while training; the final
        step's query loss otherwise.

        `evaluate` runs without autograd, so it scores the final step even when called in training
        mode: reported losses stay comparable across the MSL window. Every query pass uses the per-step
        BatchNorm's query slot, as MAML's single query pass does.
        """
        after = forward_with(self.model, trajectory[-1], buffers, query_x)
        loss = self.objective.loss(after, query_y)
        if not (self.training and torch.is_grad_enabled()):
            return loss, after
        weights = self.loss_weights(len(trajectory))
        loss = weights[-1] * loss
        # After the window the non-final weights are 0: skip their query passes.
        for params, weight in zip(trajectory[:-1], weights[:-1]):
            if weight > 0:
                loss = loss + weight * self.objective.loss(forward_with(self.model, params, buffers, query_x), query_y)
        return loss, after
