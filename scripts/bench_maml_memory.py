"""Benchmark: second-order MAML on Omniglot-shaped episodes, speed and peak memory.

What it measures. Meta-steps of MAML (Finn et al., 2017) with the paper's Omniglot network: Conv-4,
64 stride-2 filters, BatchNorm with batch statistics, 5-way 1-shot 15-query episodes of 28x28
grayscale images, meta-batch 32, inner SGD lr 0.4, cross-entropy, then an Adam step (lr 1e-3).
The images are random (speed and memory do not depend on the pixels), so no dataset is needed.

Part 1, one inner step, second order, against a plain per-task loop in the same run:

    reference              per task: support loss -> torch.autograd.grad(create_graph=True) -> fast
                           weights p - lr * g -> query loss -> backward of loss / meta-batch (each
                           task's graph freed before the next is built); then the Adam step.
    reference, one backward  the same loop, but one backward of the mean loss of all tasks (keeps
                           every task's graph alive at once), for information.
    metalearn (loop)       `MAML(..., vectorize=False)`, the default for convolutional models (auto).
    metalearn (vmap)       `MAML(..., vectorize=True)`: torch.func over the meta-batch, for information.

Part 2, peak memory against the number of inner steps (1, 5, 10) for second order, second order on
the first inner step only (`second_order_steps=1`) and first order.

Part 1 interleaves its variants in rounds and reports medians. Each measurement runs in a fresh
subprocess, so peak memory is that process's own: the figure is the growth of the peak resident set
size (ru_maxrss) over the size after building the model and the batch, i.e. what the meta-steps
themselves need. Speed is meta-steps per second after warm-up.

    python scripts/bench_maml_memory.py                      # both parts, torch's default threads
    python scripts/bench_maml_memory.py --part 1 --seconds 30

Target (part 1): metalearn's default path at least 1.0x the reference's speed at no more than 1.2x
its peak memory. The exit status is 0 either way: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn.algorithms.maml import MAML
from metalearn.models.conv import Conv4
from metalearn.objectives import Classification
from metalearn.tasks import TaskBatch

N_WAY, K_SHOT, K_QUERY, IMAGE_SIZE = 5, 1, 15, 28
INNER_LR, OUTER_LR = 0.4, 1e-3
WARMUP_STEPS = 2
SPEED_TARGET, MEMORY_TARGET = 1.0, 1.2


def peak_mib() -> float:
    """The process's peak resident set size so far, in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_batch(meta_batch_size: int, seed: int = 0) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)

    def images(per_class: int) -> torch.Tensor:
        return torch.rand(meta_batch_size, N_WAY * per_class, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(N_WAY).repeat_interleave(per_class).expand(meta_batch_size, -1).contiguous()

    return TaskBatch(images(K_SHOT), labels(K_SHOT), images(K_QUERY), labels(K_QUERY))


def reference_step(model: Conv4, batch: TaskBatch, steps: int, per_task_backward: bool) -> Callable[[], None]:
    """A meta-step of the plain per-task `torch.autograd.grad` loop."""
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    optimizer = torch.optim.Adam(params.values(), lr=OUTER_LR)

    def task_loss(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: p - INNER_LR * g for (name, p), g in zip(fast.items(), grads)}
        return F.cross_entropy(functional_call(model, fast, (qx,)), qy)

    def step() -> None:
        optimizer.zero_grad()
        tasks = list(zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y))
        if per_task_backward:
            for task in tasks:
                (task_loss(*task) / len(tasks)).backward()
        else:
            torch.stack([task_loss(*task) for task in tasks]).mean().backward()
        optimizer.step()

    return step


def metalearn_step(model: Conv4, batch: TaskBatch, steps: int, vectorize: bool, mode: str) -> Callable[[], None]:
    """A meta-step as the trainer runs it: zero_grad, meta_train_step, optimizer step."""
    algorithm = MAML(model, Classification(), inner_lr=INNER_LR, inner_steps=steps, vectorize=vectorize,
                     first_order=mode == "first_order", second_order_steps=1 if mode == "second_order_1" else None)
    algorithm.measure_pre_adaptation = False  # as the trainer, except on its logging steps
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=OUTER_LR)

    def step() -> None:
        optimizer.zero_grad()
        algorithm.meta_train_step(batch)
        optimizer.step()

    return step


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    torch.manual_seed(0)
    model = Conv4(1, N_WAY, IMAGE_SIZE, hidden=64, norm="batch", downsample="stride")
    batch = make_batch(args.meta_batch_size)
    if args.variant.startswith("reference"):
        step = reference_step(model, batch, args.inner_steps, per_task_backward=args.variant == "reference")
    else:
        step = metalearn_step(model, batch, args.inner_steps, args.variant == "vmap", args.mode)
    base = peak_mib()
    for _ in range(WARMUP_STEPS):
        step()
    n, start = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - start < args.seconds:
        step()
        n += 1
    rate = n / (time.perf_counter() - start)
    print(json.dumps({"steps_per_s": rate, "peak_mib": peak_mib() - base, "base_mib": base}))


def measure(args: argparse.Namespace, variant: str, inner_steps: int, mode: str = "second_order") -> dict[str, float]:
    command = [sys.executable, __file__, "--child", "--variant", variant, "--inner-steps", str(inner_steps),
               "--mode", mode, "--meta-batch-size", str(args.meta_batch_size), "--seconds", str(args.seconds)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def part_one(args: argparse.Namespace) -> None:
    print(f"\nPart 1: 1 inner step, second order, meta-batch {args.meta_batch_size}, median of {args.rounds} rounds")
    variants = [("reference", "reference (per-task backward)"), ("reference_one_backward", "reference, one backward"),
                ("loop", "metalearn (loop, the default)"), ("vmap", "metalearn (vmap)")]
    # Interleaved rounds, median per variant: background load affects every variant alike.
    rounds = [{key: measure(args, key, 1) for key, _ in variants} for _ in range(args.rounds)]
    results = {key: {stat: statistics.median(r[key][stat] for r in rounds) for stat in ("steps_per_s", "peak_mib")}
               for key, _ in variants}
    ref = results["reference"]
    print(f"{'variant':32s}{'meta-steps/s':>13s}{'vs ref':>8s}{'peak MiB':>10s}{'vs ref':>8s}")
    for key, name in variants:
        r = results[key]
        print(f"{name:32s}{r['steps_per_s']:13.2f}{r['steps_per_s'] / ref['steps_per_s']:7.2f}x"
              f"{r['peak_mib']:10.0f}{r['peak_mib'] / ref['peak_mib']:7.2f}x")
    speed = results["loop"]["steps_per_s"] / ref["steps_per_s"]
    memory = results["loop"]["peak_mib"] / ref["peak_mib"]
    verdict = "PASS" if speed >= SPEED_TARGET and memory <= MEMORY_TARGET else "FAIL"
    print(f"\nmetalearn default: {speed:.2f}x the reference's speed (target >= {SPEED_TARGET}), "
          f"{memory:.2f}x its peak memory (target <= {MEMORY_TARGET}): {verdict}")


def part_two(args: argparse.Namespace) -> None:
    print(f"\nPart 2: metalearn (loop), peak MiB and meta-steps/s against inner steps, "
          f"meta-batch {args.meta_batch_size}")
    modes = [("second_order", "second order"), ("second_order_1", "second_order_steps=1"),
             ("first_order", "first order")]
    print(f"{'inner steps':>12s}" + "".join(f"{name:>26s}" for _, name in modes))
    for steps in (1, 5, 10):
        cells = []
        for mode, _ in modes:
            r = measure(args, "loop", steps, mode)
            cells.append(f"{r['peak_mib']:9.0f} MiB {r['steps_per_s']:6.2f}/s")
        print(f"{steps:12d}" + "".join(f"{cell:>26s}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", type=int, choices=(1, 2), default=None, help="run one part only")
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of part 1; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="loop", help=argparse.SUPPRESS)
    parser.add_argument("--inner-steps", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="second_order", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); Conv-4 (64 filters, stride 2, "
          f"BatchNorm), {N_WAY}-way {K_SHOT}-shot {K_QUERY}-query 28x28, inner lr {INNER_LR}")
    if args.part in (None, 1):
        part_one(args)
    if args.part in (None, 2):
        part_two(args)


if __name__ == "__main__":
    main()
