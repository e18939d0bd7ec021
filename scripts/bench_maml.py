"""Benchmark: MAML meta-training steps per second on sinusoid regression.

What it measures. One meta-step of second-order MAML (Finn et al., 2017) on the sinusoid task:
MLP 1-40-40-1 with ReLU, meta-batch of 25 tasks, 10 support and 10 query points per task, one inner
SGD step with lr 0.01, MSE loss, then an Adam step (lr 1e-3) on the initialisation. Three variants:

    reference             a plain Python loop over tasks, written the way learn2learn's MAML works:
                          a hand-written functional forward (F.linear / F.relu over a list of tensors),
                          per task support loss -> autograd.grad(create_graph=True) -> fast weights
                          p - lr * g -> query loss; one backward of the mean query loss, Adam step.
    metalearn (vmap)      `MAML(..., vectorize=True)`: torch.func.grad vmapped over the meta-batch.
    metalearn (loop)      `MAML(..., vectorize=False)`: metalearn's per-task path, for information.

A metalearn meta-step is `optimizer.zero_grad(); algorithm.meta_train_step(batch); optimizer.step()`
as the trainer runs it on the steps it does not log (`measure_pre_adaptation = False`: no query pass
before adaptation, which the trainer asks for once every `trainer.log_every` steps). It still computes
the post-adaptation metrics that `meta_train_step` returns; the reference computes none of these.

How it keeps the comparison fair. All variants start from the same initial weights and cycle over
the same pre-sampled task batches (drawn once from a fixed torch.Generator, so sampling is excluded).
Each measurement builds a fresh model and optimizer, runs warm-up steps, then counts steps over a
fixed wall-clock duration. Measurements are interleaved in rounds (reference, vmap, loop; repeated)
and the median per variant is reported, so background load affects every variant alike. Before any
timing, the script checks that both metalearn paths produce the reference's meta-gradient.

Run it from the repository root:

    python scripts/bench_maml.py                  # torch's default thread count
    python scripts/bench_maml.py --threads 1 --seconds 10 --rounds 5

It prints a table (variant, meta-steps/s, ratio to the reference) and a PASS/FAIL line against the
target speed-up of metalearn's vmap path. The exit status is 0 either way: this is a measurement.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.algorithms.maml import MAML
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.models.mlp import MLP
from metalearn.tasks import TaskBatch

HIDDEN_SIZES = (40, 40)
K_SHOT = 10
K_QUERY = 10
INNER_LR = 0.01
OUTER_LR = 1e-3
N_BATCHES = 50
WARMUP_STEPS = 20
SEED = 0
TARGET_RATIO = 3.5
MIN_RELIABLE_STEPS = 10

State = dict[str, Tensor]
Step = Callable[[TaskBatch], None]


@dataclass(frozen=True)
class Variant:
    """A named way to run meta-steps; `make_step(initial)` builds fresh model and optimizer state."""

    name: str
    make_step: Callable[[State], Step]


def functional_mlp(params: Sequence[Tensor], x: Tensor) -> Tensor:
    """The MLP's forward pass over a flat [weight, bias, weight, bias, ...] list."""
    n_layers = len(params) // 2
    for i in range(n_layers):
        x = F.linear(x, params[2 * i], params[2 * i + 1])
        if i < n_layers - 1:
            x = F.relu(x)
    return x


def reference_meta_loss(params: list[Tensor], batch: TaskBatch, inner_lr: float) -> Tensor:
    """Mean query loss after one second-order inner step per task, as a plain loop over tasks."""
    losses = []
    for support_x, support_y, query_x, query_y in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y):
        support_loss = F.mse_loss(functional_mlp(params, support_x), support_y)
        grads = torch.autograd.grad(support_loss, params, create_graph=True)
        fast = [p - inner_lr * g for p, g in zip(params, grads)]
        losses.append(F.mse_loss(functional_mlp(fast, query_x), query_y))
    # One backward through the summed graph, not one per task: the fastest a plain loop can be.
    return torch.stack(losses).mean()


def reference_step(initial: State) -> Step:
    """A meta-step of the reference loop, with its own copy of the initial weights and Adam state."""
    params = [t.detach().clone().requires_grad_() for t in initial.values()]
    optimizer = torch.optim.Adam(params, lr=OUTER_LR)

    def step(batch: TaskBatch) -> None:
        optimizer.zero_grad()
        reference_meta_loss(params, batch, INNER_LR).backward()
        optimizer.step()

    return step


def build_maml(initial: State, vectorize: bool) -> MAML:
    """metalearn's MAML on a fresh MLP loaded with `initial`."""
    model = MLP(1, 1, HIDDEN_SIZES, "relu")
    model.load_state_dict(initial)
    return MAML(model, SinusoidTasks().objective, inner_lr=INNER_LR, vectorize=vectorize)


def metalearn_step(vectorize: bool) -> Callable[[State], Step]:
    """A factory of metalearn meta-steps on the vmap or the per-task path."""

    def make(initial: State) -> Step:
        algorithm = build_maml(initial, vectorize)
        algorithm.measure_pre_adaptation = False  # as the trainer, except on its logging steps
        optimizer = torch.optim.Adam(algorithm.parameters(), lr=OUTER_LR)

        def step(batch: TaskBatch) -> None:
            optimizer.zero_grad()
            algorithm.meta_train_step(batch)
            optimizer.step()

        return step

    return make


def check_gradients(initial: State, batch: TaskBatch) -> bool:
    """Print the largest difference between each metalearn path's meta-gradient and the reference's."""
    params = [t.detach().clone().requires_grad_() for t in initial.values()]
    expected = torch.autograd.grad(reference_meta_loss(params, batch, INNER_LR), params)
    ok = True
    for vectorize in (True, False):
        algorithm = build_maml(initial, vectorize)
        algorithm.meta_train_step(batch)
        # A parameter that meta_train_step left without a gradient counts as a zero gradient.
        actual = [torch.zeros_like(p) if p.grad is None else p.grad for p in algorithm.model.parameters()]
        diff = max((a - e).abs().max().item() for a, e in zip(actual, expected))
        close = all(torch.allclose(a, e, rtol=1e-4, atol=1e-6) for a, e in zip(actual, expected))
        ok = ok and close
        print(f"meta-gradient check, vectorize={vectorize}: max |metalearn - reference| = {diff:.2e} "
              f"({'allclose' if close else 'NOT CLOSE'})")
    return ok


def measure(make_step: Callable[[State], Step], initial: State, batches: Sequence[TaskBatch], seconds: float) -> float:
    """Meta-steps per second of a fresh instance, after warm-up, over at least `seconds` of wall clock."""
    step = make_step(initial)
    for i in range(WARMUP_STEPS):
        step(batches[i % len(batches)])
    gc.collect()
    n_steps = 0
    start = time.perf_counter()
    while True:
        step(batches[n_steps % len(batches)])
        n_steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n_steps / elapsed


def load_average() -> str:
    """The 1/5/15-minute load averages: other work on the machine depresses absolute rates."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def sinusoid_setup(meta_batch_size: int) -> tuple[State, list[TaskBatch]]:
    """The seeded initial MLP weights and the pre-sampled task batches every variant cycles over."""
    torch.manual_seed(SEED)
    initial = {k: v.detach().clone() for k, v in MLP(1, 1, HIDDEN_SIZES, "relu").state_dict().items()}
    sampler = SinusoidTasks(k_shot=K_SHOT, k_query=K_QUERY)
    generator = torch.Generator().manual_seed(SEED)
    return initial, [sampler.sample(meta_batch_size, "train", generator) for _ in range(N_BATCHES)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MAML sinusoid meta-steps/s: metalearn vs a plain autograd loop.")
    parser.add_argument("--seconds", type=float, default=5.0, help="wall-clock seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--meta-batch-size", type=int, default=25, help="tasks per meta-step")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    initial, batches = sinusoid_setup(args.meta_batch_size)

    widths = "-".join(map(str, HIDDEN_SIZES))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); MLP 1-{widths}-1, "
          f"meta-batch {args.meta_batch_size}, K={K_SHOT} support / {K_QUERY} query, 1 inner step, second order")
    print(f"load average at start: {load_average()} on {os.cpu_count()} CPU(s)")
    gradients_agree = check_gradients(initial, batches[0])
    if not gradients_agree:
        print("metalearn's meta-gradient differs from the reference: the timings below compare different maths")

    variants = [
        Variant("reference (autograd loop)", reference_step),
        Variant("metalearn (vmap)", metalearn_step(vectorize=True)),
        Variant("metalearn (loop)", metalearn_step(vectorize=False)),
    ]
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            rates[variant.name].append(measure(variant.make_step, initial, batches, args.seconds))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{name} {r[-1]:.1f}/s" for name, r in rates.items()))

    medians = {name: statistics.median(r) for name, r in rates.items()}
    reference = medians[variants[0].name]
    print(f"\n{'variant':<28}{'meta-steps/s':>14}{'vs reference':>14}")
    for name, median in medians.items():
        print(f"{name:<28}{median:>14.1f}{median / reference:>13.2f}x")
    print(f"load average at end: {load_average()}")
    if min(min(r) for r in rates.values()) * args.seconds < MIN_RELIABLE_STEPS:
        print(f"warning: a measurement took fewer than {MIN_RELIABLE_STEPS} steps; the machine is too busy "
              "(try --threads 1 or more --seconds) and these rates are unreliable")
    ratio = medians[variants[1].name] / reference
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    if not gradients_agree:
        verdict = "FAIL (meta-gradients differ)"
    print(f"\nmetalearn/reference speed ratio: {ratio:.1f}x (target >= {TARGET_RATIO}x): {verdict}")


if __name__ == "__main__":
    main()
