"""Process-level concerns of a run: which device to use, precision, the memory allocator, and
stopping cleanly on signals."""

from __future__ import annotations

import ctypes
import logging
import platform
import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from metalearn.checks import one_of

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU; `cpu` and `cuda[:N]` are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    one_of("device", device.split(":")[0], ("auto", "cpu", "cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine (use auto or cpu)")
    return torch.device(device)


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_convolutional(model: nn.Module) -> bool:
    """Whether `model` has convolution layers."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 convolutions and matrix products natively: a CPU with
    AVX-512 BF16 or AMX (what oneDNN reports), or a CUDA device that supports bfloat16."""
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, device: torch.device, model: nn.Module) -> torch.dtype:
    """The compute precision of a run: `float32`, `bfloat16` (autocast: convolutions and matrix
    products in bfloat16, weights, gradients, losses and normalisation statistics in float32), or
    `auto`: bfloat16 for convolutional models on a CPU that has native bfloat16, where it is measured
    to train faster (1.2x for compiled second-order MAML, 1.7x for ProtoNet) to the same accuracy
    (docs/performance.md), float32 everywhere else
    (CUDA devices, CPUs without bfloat16, models without convolutions)."""
    if precision == "auto":
        fast = device.type == "cpu" and native_bfloat16(device) and is_convolutional(model)
        return torch.bfloat16 if fast else torch.float32
    one_of("precision", precision, ("auto", *PRECISIONS))
    if PRECISIONS[precision] == torch.bfloat16 and not native_bfloat16(device):
        raise ValueError(f"precision={precision!r}: this {device.type} device has no native bfloat16 "
                         "(use auto or float32)")
    return PRECISIONS[precision]


ALLOCATORS = ("auto", "retain", "system")
# glibc's mallopt parameters (malloc.h) and the freed memory kept at the top of the heap under `retain`.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
RETAINED_BYTES = 1 << 30


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None on a system whose C library is not glibc (macOS, Windows, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def resolve_allocator(allocator: str, device: torch.device) -> str:
    """How host memory is managed in this process, applied at once: `system` leaves the C library's
    allocator as configured; `retain` (glibc) serves every allocation from the heap and keeps up to
    1 GiB of freed memory there (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 1 GiB)`). By
    default glibc maps each block of 32 MiB or more (and smaller ones until its threshold adapts) with
    mmap and unmaps it when freed, so a training step that frees and reallocates its activations pays for
    zero-filling fresh pages every step: retained, ProtoNet's 60-way Omniglot training ran at 2.06x the
    meta-steps/s (scripts/bench_allocator.py, docs/performance.md). `auto`: `retain` for runs on the CPU under
    glibc, `system` otherwise (a GPU's memory has its own caching allocator). The setting lasts for the
    process; a preloaded allocator (LD_PRELOAD=libtcmalloc...) replaces glibc's malloc, and `retain` then
    changes nothing."""
    one_of("allocator", allocator, ALLOCATORS)
    if allocator == "system" or (allocator == "auto" and device.type != "cpu"):
        return "system"
    mallopt = glibc_mallopt()
    if mallopt is None:
        if allocator == "retain":
            raise ValueError(f"allocator='retain': needs glibc's mallopt, and this system's C library is "
                             f"{platform.libc_ver()[0] or 'not glibc'} (use auto or system)")
        return "system"
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, RETAINED_BYTES) != 1:
        raise RuntimeError("glibc's mallopt refused M_MMAP_MAX=0 or M_TRIM_THRESHOLD=1 GiB")
    return "retain"


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[object]:
    """Autocast to `dtype` on `device` for reduced precision; nothing for float32 (or float64)."""
    if dtype in (torch.float32, torch.float64):
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: torch.device) -> AbstractContextManager[object]:
    """Autocast switched off on `device`: operations inside run in their inputs' precision. Distances and
    similarities between float32 embeddings go here, since autocast would otherwise run their matrix
    products in bfloat16, whose 8-bit mantissa turns ||q||^2 - 2 q.c + ||c||^2 into noise (a logit off by
    1.6 for squared distances near 1,000)."""
    return torch.autocast(device.type, enabled=False)


class Compiled:
    """`fn` compiled with torch.compile. If compiling fails on the first call (no C++ compiler, an
    operation the compiler does not support), warn once and run `fn` eagerly from then on. `works` is
    None before the first call, then whether the compiled function is the one that runs."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.compiled = fn, torch.compile(fn, dynamic=False)
        self.works: bool | None = None

    def __call__(self, *args: Any) -> Any:
        if self.works is not None:
            return (self.compiled if self.works else self.fn)(*args)
        try:
            outcome = self.compiled(*args)
        except Exception as ex:  # noqa: BLE001 - any failure to compile falls back to the same function, eager
            first = (str(ex).strip().splitlines() or [type(ex).__name__])[0]
            log.warning("torch.compile failed (%s: %s); training continues without compiling "
                        "(trainer.compile=false skips the attempt)", type(ex).__name__, first)
            self.works = False
            return self.fn(*args)
        self.works = True
        return outcome


@contextmanager
def stop_on_signal() -> Iterator[list[int]]:
    """Turn the first SIGINT/SIGTERM into a request to stop at the next step boundary, so that the
    saved state is consistent; a second Ctrl-C interrupts at once."""
    received: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

