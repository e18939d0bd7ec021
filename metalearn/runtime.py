"""Process-level concerns of a run: which device to use, and stopping cleanly on signals."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from metalearn.checks import one_of


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU; `cpu` and `cuda[:N]` are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    one_of("device", device.split(":")[0], ("auto", "cpu", "cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine (use auto or cpu)")
    return torch.device(device)


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

