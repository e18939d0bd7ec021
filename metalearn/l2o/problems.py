"""Optimizee problem families for learned optimizers (Andrychowicz et al., 2016, Section 3).

A family samples a batch of B problems from a `torch.Generator`. Each problem's parameters are a flat
vector (θ is [B, n]) and its loss is a pure function of them, so gradients can flow through an unrolled
optimisation. Per-step randomness (the minibatch of step t, the noise of a noisy quadratic) comes from
each problem's own seed and the step index, so a problem sees the same sequence under every optimizer
and whichever batch it is evaluated in. Problem batches concatenate (`cat`) and index like task batches,
so the trainer's fixed validation and test sets work on them.

References:
    Andrychowicz et al. (2016). Learning to learn by gradient descent by gradient descent. NeurIPS.
    https://arxiv.org/abs/1606.04474
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.tasks import derived_seed

P = TypeVar("P")


class ProblemFamily(Protocol[P]):
    """A distribution of optimizee problems: what a learned optimizer is trained and evaluated on."""

    def sample(self, batch_size: int, generator: torch.Generator) -> P:
        """A batch of `batch_size` problems drawn from `generator` alone."""

    def initial_params(self, problem: P) -> Tensor:
        """The starting point θ_0 of each problem, [B, n]."""

    def loss(self, problem: P, theta: Tensor, step: int) -> Tensor:
        """The loss of each problem at `theta` [B, n] on optimisation step `step`, [B]."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a problem batch's randomness at optimisation step `step`."""
    return torch.Generator().manual_seed(derived_seed(seed, step))


def draw_seeds(n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2**62, (n,), generator=generator)


B = TypeVar("B", bound="ProblemBatch")


class ProblemBatch:
    """A batch of problems as a dataclass of tensors with a leading problem dimension (`theta0` among
    them, `seeds` the per-problem seeds): length, indexing, concatenation."""

    kind: ClassVar[str] = "optimizee problems"

    theta0: Tensor
    seeds: Tensor

    def __len__(self) -> int:
        return len(self.theta0)

    def __getitem__(self: B, i: int | slice) -> B:
        rows = slice(i, i + 1) if isinstance(i, int) else i
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)})  # type: ignore[type-var,arg-type]

    def to(self: B, device: torch.device | str) -> B:
        return self  # optimizee problems run on the CPU with the optimizer

    @classmethod
    def cat(cls: type[B], batches: Sequence[B]) -> B:
        return cls(**{f.name: torch.cat([getattr(b, f.name) for b in batches])  # type: ignore[call-arg]
                      for f in fields(batches[0])})  # type: ignore[arg-type]


@dataclass(frozen=True)
class QuadraticProblem(ProblemBatch):
    """A batch of quadratics f(θ) = ‖Wθ − y‖²: W [B, dim, dim], y [B, dim], θ_0 [B, dim], and each
    problem's seed of its per-step target noise [B]."""

    w: Tensor
    y: Tensor
    theta0: Tensor
    seeds: Tensor


class Quadratic:
    """The paper's synthetic 10-dimensional quadratics (Section 3.1): f(θ) = ‖Wθ − y‖² with W, y and the
    initial θ drawn i.i.d. from the standard normal.

    Args:
        dim: the dimension of θ (10 in the paper).
        noise_std: standard deviation of fresh noise added to y at every step (a stochastic objective);
            0 gives the paper's deterministic quadratics.
        dtype: the dtype of W, y and θ.
    """

    def __init__(self, dim: int = 10, noise_std: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        if dim < 1:
            raise ValueError(f"dim={dim}: must be at least 1")
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std!r}: must be non-negative")
        self.dim = dim
        self.noise_std = noise_std
        self.dtype = dtype

    def sample(self, batch_size: int, generator: torch.Generator) -> QuadraticProblem:
        w = torch.randn(batch_size, self.dim, self.dim, generator=generator, dtype=self.dtype)
        y = torch.randn(batch_size, self.dim, generator=generator, dtype=self.dtype)
        theta0 = torch.randn(batch_size, self.dim, generator=generator, dtype=self.dtype)
        return QuadraticProblem(w, y, theta0, draw_seeds(batch_size, generator))

    def initial_params(self, problem: QuadraticProblem) -> Tensor:
        return problem.theta0

    def loss(self, problem: QuadraticProblem, theta: Tensor, step: int) -> Tensor:
        y = problem.y
        if self.noise_std > 0:
            noise = torch.stack([torch.randn(y.shape[1:], generator=step_generator(int(seed), step), dtype=y.dtype)
                                 for seed in problem.seeds])
            y = y + self.noise_std * noise
        residual = (problem.w @ theta.unsqueeze(-1)).squeeze(-1) - y
        return (residual**2).sum(-1)


@dataclass(frozen=True)
class MLPProblem(ProblemBatch):
    """A batch of MLP initialisations θ_0 [B, n] and each one's seed of its minibatch sequence [B]."""

    theta0: Tensor
    seeds: Tensor


class MLPClassifier:
    """Training a small MLP classifier on minibatches (the paper's MNIST experiment, Section 3.2): one
    hidden layer of 20 sigmoid units, the cross-entropy of a fresh minibatch of 128 examples at every step.

    A problem is a random initialisation of the MLP (every weight and bias i.i.d. N(0, `init_std`²)) and
    its minibatch sequence. The data are given as tensors, so any dataset (or synthetic data) can be used.
    The paper's generalisation checks change the optimizee: `wider=True` doubles the hidden layer (40
    units), `activation="relu"` swaps the sigmoid for ReLU.

    Args:
        x: inputs [N, D] (images flattened).
        y: class labels [N] in 0 … classes − 1.
        hidden: hidden units (20 in the paper).
        wider: double `hidden` (the paper's "wider optimizee" with 40 units).
        batch_size: examples per minibatch (128 in the paper).
        activation: the hidden layer's nonlinearity.
        classes: the number of classes (by default one more than the largest label).
        init_std: standard deviation of the initial weights and biases.
    """

    def __init__(self, x: Tensor, y: Tensor, hidden: int = 20, wider: bool = False, batch_size: int = 128,
                 activation: Literal["sigmoid", "relu"] = "sigmoid", classes: int | None = None,
                 init_std: float = 0.01) -> None:
        if x.dim() != 2 or y.shape != (len(x),):
            raise ValueError(f"x {list(x.shape)} and y {list(y.shape)}: expected [N, D] inputs and [N] labels")
        if activation not in ("sigmoid", "relu"):
            raise ValueError(f"activation={activation!r}: must be sigmoid or relu")
        if hidden < 1 or batch_size < 1:
            raise ValueError(f"hidden={hidden}, batch_size={batch_size}: both must be at least 1")
        self.x = x
        self.y = y.long()
        self.hidden = 2 * hidden if wider else hidden
        self.batch_size = batch_size
        self.activation = activation
        self.classes = int(self.y.max()) + 1 if classes is None else classes
        if self.y.min() < 0 or self.y.max() >= self.classes:
            raise ValueError(f"labels span {int(self.y.min())} … {int(self.y.max())}: expected 0 … {self.classes - 1}")
        self.init_std = init_std
        d, h, c = x.shape[1], self.hidden, self.classes
        # The flat vector holds W1 [D, H], b1 [H], W2 [H, C], b2 [C] in this order.
        self.shapes = [(d, h), (h,), (h, c), (c,)]
        self.n_params = d * h + h + h * c + c

    def sample(self, batch_size: int, generator: torch.Generator) -> MLPProblem:
        theta0 = self.init_std * torch.randn(batch_size, self.n_params, generator=generator, dtype=self.x.dtype)
        return MLPProblem(theta0, draw_seeds(batch_size, generator))

    def initial_params(self, problem: MLPProblem) -> Tensor:
        return problem.theta0

    def minibatch(self, problem: MLPProblem, step: int) -> tuple[Tensor, Tensor]:
        """Each problem's minibatch at `step`: inputs [B, batch_size, D] and labels [B, batch_size]."""
        rows = torch.stack([torch.randint(0, len(self.x), (self.batch_size,), generator=step_generator(int(seed), step))
                            for seed in problem.seeds])
        return self.x[rows], self.y[rows]

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        """The MLPs' outputs [B, M, C] on inputs x [B, M, D], with θ [B, n] the flat parameters."""
        w1, b1, w2, b2 = (part.reshape(len(theta), *shape) for part, shape in
                          zip(theta.split([torch.Size(s).numel() for s in self.shapes], dim=1), self.shapes))
        pre = torch.baddbmm(b1.unsqueeze(1), x, w1)
        hidden = torch.sigmoid(pre) if self.activation == "sigmoid" else torch.relu(pre)
        return torch.baddbmm(b2.unsqueeze(1), hidden, w2)

    def loss(self, problem: MLPProblem, theta: Tensor, step: int) -> Tensor:
        x, y = self.minibatch(problem, step)
        logits = self.logits(theta, x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def omniglot_classifier(root: str, alphabets: int = 10, image_size: int = 28, cache_dir: str | None = None,
                        **mlp_args: Any) -> MLPClassifier:
    """Training an MLP on Omniglot drawings, the paper's MNIST experiment on data available here: the
    drawings of the first `alphabets` alphabets of the background set (sorted by name), each labelled
    with its alphabet, as `image_size`² inputs in [0, 1].

    Args:
        root: the folder holding Omniglot's archives (`images_background.zip` or its extracted folder).
        alphabets: how many alphabets (classes), 1 … 30.
        image_size: side of the square images.
        cache_dir: where decoded images are cached (None: no cache).
        **mlp_args: MLPClassifier's settings (hidden, wider, batch_size, activation, init_std).
    """
    from metalearn.data.omniglot import load_archive

    images, characters = load_archive(Path(root).expanduser(), "background", image_size,
                                      Path(cache_dir).expanduser() if cache_dir else None)
    names = sorted({character.split("/", 1)[0] for character in characters})
    if not 1 <= alphabets <= len(names):
        raise ValueError(f"alphabets={alphabets}: must be between 1 and {len(names)} (the background set's)")
    label_of = {name: i for i, name in enumerate(names[:alphabets])}
    labels = [label_of.get(character.split("/", 1)[0], -1) for character in characters]
    keep = torch.tensor([label >= 0 for label in labels])
    x = images[keep].flatten(1).to(torch.float32) / 255.0
    y = torch.tensor(labels)[keep]
    return MLPClassifier(x, y, classes=alphabets, **mlp_args)
