"""Benchmark: meta-training steps per second of each optimisation-based method on sinusoid regression.

What it measures. `scripts/bench_maml.py` extended to metalearn's other optimisation-based methods, in
its setting: MLP 1-40-40-1 ReLU, meta-batch 25, 10 support and 10 query points per task, inner SGD
with lr 0.01, MSE, then an Adam step (lr 1e-3) on every meta-parameter (weights and learned rates).

    FOMAML     MAML(first_order=True): one inner step whose gradient is a constant to the outer pass.
    Meta-SGD   MetaSGD: one second-order step, a learned rate per weight entry (all start at 0.01).
    MAML++     MAMLPlusPlus: 2 second-order steps, learned per-layer per-step rates (start at 0.01),
               multi-step loss on (uniform weights: its schedule at meta-step 0, where it stays here).
    Reptile    Reptile: 5 inner SGD steps on the full support set; pseudo-gradient mean(theta - phi).
    ANIL       ANIL: one second-order step on the last layer only.

Each runs three ways: `reference`, a plain Python loop over tasks as in bench_maml.py (its
`functional_mlp`, per-task `torch.autograd.grad`, one backward of the mean query loss; for Reptile,
phi per task by plain autograd and `.grad = mean(theta - phi)` written by hand); `vmap`, the
algorithm built as its config builds it with `vectorize=True`; `loop`, the same with `vectorize=False`.
A metalearn step runs as the trainer runs it on the steps it does not log (`measure_pre_adaptation =
False`) and still computes the post-adaptation metrics it reports; the references compute none.

Fairness, as in bench_maml.py (whose `measure` it uses): the same initial weights and rates and the
same pre-sampled batches for every variant; fresh state, warm-up, then steps counted over a fixed
wall-clock time; measurements interleaved in rounds, medians reported. Before timing, both metalearn
paths' meta-gradients (and learned-rate gradients) are checked against the reference's on one batch.

Run it from the repository root:

    python scripts/bench_methods.py                            # every method, torch's default threads
    python scripts/bench_methods.py --methods metasgd anil --threads 1 --seconds 10 --rounds 5

It prints a table (meta-steps/s of each variant, ratios to the reference), a PASS/FAIL line per method
for the vmap ratio against the target, the thread count and the load average. The exit status is 0
either way: this is a measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from bench_maml import (
    HIDDEN_SIZES,
    INNER_LR,
    K_QUERY,
    K_SHOT,
    MIN_RELIABLE_STEPS,
    OUTER_LR,
    TARGET_RATIO,
    State,
    Step,
    Variant,
    functional_mlp,
    load_average,
    measure,
    sinusoid_setup,
)
from torch import Tensor

from metalearn.algorithms.anil import ANIL
from metalearn.algorithms.functional import InnerSGD
from metalearn.algorithms.maml import MAML
from metalearn.algorithms.mamlpp import MAMLPlusPlus
from metalearn.algorithms.metasgd import MetaSGD, lr_key
from metalearn.algorithms.reptile import Reptile
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.models.mlp import MLP
from metalearn.tasks import TaskBatch

META_BATCH_SIZE = 25
MAMLPP_STEPS = 2
MSL_WINDOW = 5000
REPTILE_STEPS = 5
# The plain loop, then metalearn's vmap path and its per-task path.
VARIANTS = ("reference", "vmap", "loop")

Tensors = list[Tensor]
# A per-task outer loss of the reference: (weights, rates, support_x, support_y, query_x, query_y).
TaskLoss = Callable[[Tensors, Tensors, Tensor, Tensor, Tensor, Tensor], Tensor]
# A reference meta-gradient: fills `.grad` of the weights and rates from one batch.
Reference = Callable[[Tensors, Tensors, TaskBatch], None]


def no_rates(weights: Tensors) -> Tensors:
    return []


def per_entry_rates(weights: Tensors) -> Tensors:
    """Meta-SGD's rates: one per weight entry, all at the inner lr (init_lr_range [lr, lr])."""
    return [torch.full_like(w, INNER_LR).requires_grad_() for w in weights]


def per_step_rates(weights: Tensors) -> Tensors:
    """MAML++'s rates: one per weight tensor and inner step, all at the inner lr."""
    return [torch.full((MAMLPP_STEPS,), INNER_LR, requires_grad=True) for _ in weights]


@dataclass(frozen=True)
class Method:
    """A method: metalearn's class and constructor arguments (as its YAML gives them), and its reference."""

    key: str
    name: str
    algorithm: type[MAML]
    options: dict[str, Any]
    reference: Reference
    rates: Callable[[Tensors], Tensors] = no_rates


def backward_of(task_loss: TaskLoss) -> Reference:
    """The reference meta-gradient of a per-task loss: a loop over tasks, one backward of the mean."""

    def reference(weights: Tensors, rates: Tensors, batch: TaskBatch) -> None:
        tasks = zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        torch.stack([task_loss(weights, rates, *task) for task in tasks]).mean().backward()

    return reference


def inner_grads(weights: Tensors, x: Tensor, y: Tensor, create_graph: bool) -> Tensors:
    """Gradients of the support loss, second-order differentiable iff `create_graph`."""
    return list(torch.autograd.grad(F.mse_loss(functional_mlp(weights, x), y), weights, create_graph=create_graph))


def fomaml_task(weights: Tensors, rates: Tensors, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
    # Without create_graph the inner gradient is detached: the update flows through the identity only.
    grads = inner_grads(weights, sx, sy, create_graph=False)
    fast = [w - INNER_LR * g for w, g in zip(weights, grads)]
    return F.mse_loss(functional_mlp(fast, qx), qy)


def metasgd_task(weights: Tensors, rates: Tensors, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
    grads = inner_grads(weights, sx, sy, create_graph=True)
    fast = [w - a * g for w, a, g in zip(weights, rates, grads)]
    return F.mse_loss(functional_mlp(fast, qx), qy)


def mamlpp_task(weights: Tensors, rates: Tensors, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
    fast, losses = weights, []
    for step in range(MAMLPP_STEPS):
        grads = inner_grads(fast, sx, sy, create_graph=True)
        fast = [w - a[step] * g for w, a, g in zip(fast, rates, grads)]
        losses.append(F.mse_loss(functional_mlp(fast, qx), qy))
    # The multi-step loss at meta-step 0: every inner step's query loss weighted 1 / steps.
    return torch.stack(losses).mean()


def anil_task(weights: Tensors, rates: Tensors, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
    body, head = weights[:-2], weights[-2:]
    support, query = (F.relu(functional_mlp(body, x)) for x in (sx, qx))
    grads = inner_grads(head, support, sy, create_graph=True)
    fast = [w - INNER_LR * g for w, g in zip(head, grads)]
    return F.mse_loss(functional_mlp(fast, query), qy)


def reptile_reference(weights: Tensors, rates: Tensors, batch: TaskBatch) -> None:
    """Per task, phi after plain SGD steps; `.grad` of theta is written by hand as mean(theta - phi)."""
    total = [torch.zeros_like(w) for w in weights]
    for sx, sy in zip(batch.support_x, batch.support_y):
        phi = [w.detach().requires_grad_() for w in weights]
        for _ in range(REPTILE_STEPS):
            grads = inner_grads(phi, sx, sy, create_graph=False)
            with torch.no_grad():
                phi = [(p - INNER_LR * g).requires_grad_() for p, g in zip(phi, grads)]
        with torch.no_grad():
            for t, w, p in zip(total, weights, phi):
                t += w - p
    for w, t in zip(weights, total):
        w.grad = t / len(batch)


METHODS = {m.key: m for m in (
    Method("fomaml", "FOMAML", MAML, {"first_order": True}, backward_of(fomaml_task)),
    Method("metasgd", "Meta-SGD", MetaSGD, {"init_lr_range": (INNER_LR, INNER_LR)}, backward_of(metasgd_task),
           per_entry_rates),
    Method("mamlpp", "MAML++", MAMLPlusPlus, {"inner_steps": MAMLPP_STEPS, "multi_step_loss_steps": MSL_WINDOW,
                                              "learn_inner_lr": True}, backward_of(mamlpp_task), per_step_rates),
    Method("reptile", "Reptile", Reptile, {"inner_steps": REPTILE_STEPS, "inner_optimizer": InnerSGD(),
                                           "inner_batch_size": None}, reptile_reference),
    Method("anil", "ANIL", ANIL, {"head": "auto"}, backward_of(anil_task)),
)}


def build(method: Method, initial: State, vectorize: bool) -> MAML:
    """metalearn's algorithm on a fresh MLP loaded with `initial`."""
    model = MLP(1, 1, HIDDEN_SIZES, "relu")
    model.load_state_dict(initial)
    return method.algorithm(model, SinusoidTasks().objective, inner_lr=INNER_LR, vectorize=vectorize,
                            **method.options)


def reference_leaves(method: Method, initial: State) -> tuple[Tensors, Tensors]:
    """Fresh reference weights (copies of `initial`) and learned rates, all leaves requiring grad."""
    weights = [t.detach().clone().requires_grad_() for t in initial.values()]
    return weights, method.rates(weights)


def step_factory(method: Method, variant: str) -> Callable[[State], Step]:
    """Meta-steps of one of `VARIANTS`, each instance with fresh weights, rates and Adam state."""

    def make(initial: State) -> Step:
        fill_grads: Callable[[TaskBatch], object]
        if variant == "reference":
            weights, rates = reference_leaves(method, initial)
            meta_params, fill_grads = weights + rates, partial(method.reference, weights, rates)
        else:
            algorithm = build(method, initial, vectorize=variant == "vmap")
            algorithm.measure_pre_adaptation = False  # as the trainer, except on its logging steps
            meta_params, fill_grads = list(algorithm.parameters()), algorithm.meta_train_step
        optimizer = torch.optim.Adam(meta_params, lr=OUTER_LR)

        def step(batch: TaskBatch) -> None:
            optimizer.zero_grad()
            fill_grads(batch)
            optimizer.step()

        return step

    return make


def grads_of(tensors: Tensors) -> Tensors:
    # A tensor left without a gradient counts as a zero gradient.
    return [torch.zeros_like(t) if t.grad is None else t.grad for t in tensors]


def in_reference_order(algorithm: MAML, names: list[str]) -> Tensors:
    """The algorithm's parameters in the reference's order: the model's by name, then the learned
    rates of each (keyed by `lr_key`; a ParameterDict built from a dict sorts its keys)."""
    params: dict[str, Tensor] = dict(algorithm.named_parameters())
    rates = {name.rsplit(".", 1)[1]: p for name, p in params.items() if not name.startswith("model.")}
    return [params[f"model.{name}"] for name in names] + ([rates[lr_key(name)] for name in names] if rates else [])


def check_gradients(method: Method, initial: State, batch: TaskBatch) -> bool:
    """Print the largest difference between each metalearn path's gradients and the reference's."""
    weights, rates = reference_leaves(method, initial)
    method.reference(weights, rates, batch)
    expected = grads_of(weights + rates)
    ok = True
    for vectorize in (True, False):
        algorithm = build(method, initial, vectorize)
        algorithm.meta_train_step(batch)
        got = grads_of(in_reference_order(algorithm, list(initial)))
        diffs = [(a - e).abs().max().item() for a, e in zip(got, expected, strict=True)]
        close = all(torch.allclose(a, e, rtol=1e-4, atol=1e-6) for a, e in zip(got, expected))
        ok = ok and close
        rate_diff = f", learned rates {max(diffs[len(weights):]):.2e}" if rates else ""
        print(f"gradient check, {method.name}, vectorize={vectorize}: max |metalearn - reference| = "
              f"{max(diffs[:len(weights)]):.2e} (weights){rate_diff} ({'allclose' if close else 'NOT CLOSE'})")
    return ok


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sinusoid meta-steps/s of each method: metalearn vs plain loops.")
    parser.add_argument("--seconds", type=float, default=5.0, help="wall-clock seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="methods to run (default: all)")
    return parser.parse_args()


def report(methods: list[Method], speeds: dict[str, dict[str, list[float]]], agree: dict[str, bool]) -> None:
    """The table of median rates and ratios, and a verdict per method on the vmap path."""
    print(f"\n{'method':<10}{'reference/s':>13}{'vmap/s':>10}{'ratio':>8}{'loop/s':>10}{'ratio':>8}")
    for method in methods:
        ref, vmap, loop = (statistics.median(speeds[method.key][v]) for v in VARIANTS)
        print(f"{method.name:<10}{ref:>13.1f}{vmap:>10.1f}{vmap / ref:>7.2f}x{loop:>10.1f}{loop / ref:>7.2f}x")
    print()
    for method in methods:
        ratio = statistics.median(speeds[method.key]["vmap"]) / statistics.median(speeds[method.key]["reference"])
        verdict = ("PASS" if ratio >= TARGET_RATIO else "FAIL") if agree[method.key] else "FAIL (gradients differ)"
        print(f"{method.name}: metalearn vmap / reference {ratio:.1f}x (target >= {TARGET_RATIO}x): {verdict}")


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    initial, batches = sinusoid_setup(META_BATCH_SIZE)
    methods = [METHODS[key] for key in dict.fromkeys(args.methods)]

    widths = "-".join(map(str, HIDDEN_SIZES))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); MLP 1-{widths}-1, meta-batch "
          f"{META_BATCH_SIZE}, K={K_SHOT} support / {K_QUERY} query, inner lr {INNER_LR}, Adam {OUTER_LR}")
    print(f"load average at start: {load_average()} on {os.cpu_count()} CPU(s)")
    agree = {method.key: check_gradients(method, initial, batches[0]) for method in methods}

    speeds: dict[str, dict[str, list[float]]] = {m.key: {v: [] for v in VARIANTS} for m in methods}
    for round_ in range(args.rounds):
        for method in methods:
            for variant in (Variant(v, step_factory(method, v)) for v in VARIANTS):
                speeds[method.key][variant.name].append(measure(variant.make_step, initial, batches, args.seconds))
            print(f"round {round_ + 1}/{args.rounds}, {method.name}: "
                  + ", ".join(f"{name} {r[-1]:.1f}/s" for name, r in speeds[method.key].items()))

    report(methods, speeds, agree)
    print(f"\ntorch threads: {torch.get_num_threads()}; load average at end: {load_average()} "
          f"on {os.cpu_count()} CPU(s)")
    if min(min(r) for s in speeds.values() for r in s.values()) * args.seconds < MIN_RELIABLE_STEPS:
        print(f"warning: a measurement took fewer than {MIN_RELIABLE_STEPS} steps; the machine is too busy "
              "(try --threads 1 or more --seconds) and these rates are unreliable")


if __name__ == "__main__":
    main()
