"""Benchmark: Prototypical Networks training speed on Omniglot-shaped episodes, against a plain
PyTorch loop and against the machine's measured matrix-multiply throughput.

What it measures. Training steps of ProtoNet (Snell et al., 2017) with the paper's Omniglot embedding:
Conv-4, 64 filters, 2x2 max-pooling, BatchNorm, 5-way 1-shot 15-query episodes of 28x28 grayscale
images, one episode per Adam step (lr 1e-3). The images are random (speed does not depend on the
pixels), pre-drawn, so no dataset is needed; sampling real episodes costs about 0.2 ms each
(scripts/bench_sampling.py), under 1% of a step.

    reference   the plain loop of the paper's code: support and query images concatenated into one
                forward pass, prototypes by reshape-and-mean, squared distances by broadcasting,
                cross-entropy, backward, Adam step.
    reference, NHWC  the same loop with the model in the channels-last memory layout, for information.
    metalearn   `ProtoNet.meta_train_step` as the trainer runs it (zero_grad, step, optimizer step),
                with the experiments' model: Conv-4 with `channels_last=true`, in the precision a run
                resolves on this machine (`trainer.precision=auto`: bfloat16 autocast on a CPU with
                native bfloat16, float32 otherwise).
    metalearn, float32  the same in float32, for information (when auto resolves to bfloat16).
                Like the reference, and like the Omniglot experiments (`algorithm.train_pass=per_task`),
                it embeds each training episode's support and query images in one pass.

Variants alternate in rounds and medians are reported. The share of the matmul peak counts the
convolutions' multiply-adds (forward, and twice that for the backward pass) against a float32
matrix product measured in the same process with the same threads.

    python scripts/bench_protonet.py                 # torch's default threads
    python scripts/bench_protonet.py --seconds 20 --rounds 5

Target: metalearn at least 30 episodes/s on this 2-core machine and ahead of the reference
(speed ratio >= 1.0). The exit status is 0 either way: this is a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.protonet import ProtoNet
from metalearn.models.conv import Conv4
from metalearn.objectives import Classification
from metalearn.runtime import autocast, resolve_precision
from metalearn.tasks import TaskBatch

N_WAY, K_SHOT, K_QUERY, IMAGE_SIZE = 5, 1, 15, 28
LR = 1e-3
TARGET_EPISODES_PER_S = 30.0
POOL = 16  # distinct pre-drawn episodes, cycled


def make_model(seed: int = 0, channels_last: bool = False) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(1, None, IMAGE_SIZE, hidden=64, norm="batch_running", downsample="maxpool",
                 channels_last=channels_last)


def episodes(seed: int = 0) -> list[TaskBatch]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_WAY)

    def batch() -> TaskBatch:
        support = torch.rand(1, N_WAY * K_SHOT, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        query = torch.rand(1, N_WAY * K_QUERY, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        support_y, query_y = labels.repeat_interleave(K_SHOT)[None], labels.repeat_interleave(K_QUERY)[None]
        return TaskBatch(support, support_y, query, query_y)

    return [batch() for _ in range(POOL)]


def reference_step(pool: list[TaskBatch], channels_last: bool = False) -> Callable[[int], None]:
    """One training episode of the plain loop (the structure of the paper's code)."""
    model = make_model(channels_last=channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def step(i: int) -> None:
        batch = pool[i % POOL]
        optimizer.zero_grad()
        z = model(torch.cat([batch.support_x[0], batch.query_x[0]]))
        prototypes = z[: N_WAY * K_SHOT].view(N_WAY, K_SHOT, -1).mean(1)
        queries = z[N_WAY * K_SHOT:]
        distances = (queries.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)
        F.cross_entropy(-distances, batch.query_y[0]).backward()
        optimizer.step()

    return step


def metalearn_step(pool: list[TaskBatch], precision: str = "auto") -> Callable[[int], None]:
    """One training episode as the trainer runs it, with the experiment's model (channels-last)."""
    algorithm = ProtoNet(make_model(channels_last=True), Classification(), train_pass="per_task")
    algorithm.measure_pre_adaptation = False  # as the trainer, except on its logging steps
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=LR)
    device = torch.device("cpu")
    dtype = resolve_precision(precision, device, algorithm.model)

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            algorithm.meta_train_step(pool[i % POOL])
        optimizer.step()

    return step


def rate(step: Callable[[int], None], seconds: float) -> float:
    """Episodes per second after a short warm-up."""
    for i in range(3):
        step(i)
    n, start = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - start < seconds:
        step(n)
        n += 1
    return n / (time.perf_counter() - start)


def matmul_flops(seconds: float, size: int = 1024) -> float:
    """Float32 matrix-multiply throughput (FLOP/s) of this process's threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def conv_flops_per_episode() -> float:
    """Multiply-adds x 2 of the convolutions for one training episode: the forward pass over the
    episode's images, plus twice that for the backward pass (gradients of inputs and weights)."""
    model = make_model()
    total = 0.0

    def count(module: nn.Module, _: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        total += 2.0 * out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(N_WAY * (K_SHOT + K_QUERY), 1, IMAGE_SIZE, IMAGE_SIZE))
    for hook in hooks:
        hook.remove()
    return 3.0 * total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); Conv-4 (64 filters, max-pool, "
          f"BatchNorm), {N_WAY}-way {K_SHOT}-shot {K_QUERY}-query 28x28, one episode per Adam step")
    pool = episodes()
    precision = resolve_precision("auto", torch.device("cpu"), make_model())
    print(f"trainer.precision=auto resolves to {str(precision).removeprefix('torch.')} on this machine")
    variants = {"reference": reference_step(pool), "reference, NHWC": reference_step(pool, channels_last=True)}
    if precision != torch.float32:
        variants["metalearn, float32"] = metalearn_step(pool, "float32")
    variants["metalearn"] = metalearn_step(pool)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    peaks: list[float] = []
    for _ in range(args.rounds):
        peaks.append(matmul_flops(min(args.seconds, 3.0)))
        for name, step in variants.items():
            rounds[name].append(rate(step, args.seconds))
    peak = statistics.median(peaks)
    flops = conv_flops_per_episode()
    print(f"matmul peak (1024x1024 float32): {peak / 1e9:.1f} GFLOP/s; convolutions: "
          f"{flops / 1e9:.3f} GFLOP per training episode")
    print(f"{'variant':18s}{'episodes/s':>12s}{'vs ref':>9s}{'GFLOP/s':>10s}{'of peak':>9s}   rounds")
    ref = statistics.median(rounds["reference"])
    for name, values in rounds.items():
        median = statistics.median(values)
        print(f"{name:18s}{median:12.2f}{median / ref:8.2f}x{median * flops / 1e9:10.1f}{median * flops / peak:8.0%}"
              f"   {', '.join(f'{v:.2f}' for v in values)}")
    ours = statistics.median(rounds["metalearn"])
    verdict = "PASS" if ours >= TARGET_EPISODES_PER_S and ours >= ref else "FAIL"
    print(f"\nmetalearn: {ours:.1f} episodes/s (target >= {TARGET_EPISODES_PER_S:.0f}), {ours / ref:.2f}x the "
          f"reference (target >= 1.0): {verdict}")


if __name__ == "__main__":
    main()
