"""Argument checks shared by constructors. Messages start with `name=value` so that callers that
know the config path can prefix it (`dataset.k_shot=0: must be a positive integer`)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def positive_int(name: str, value: int) -> int:
    """Return `value` if it is an integer >= 1, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    return value


def non_negative_int(name: str, value: int) -> int:
    """Return `value` if it is an integer >= 0, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: must be an integer >= 0")
    return value


def non_negative_float(name: str, value: float) -> float:
    """Return `value` as a float if it is finite and >= 0, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r}: must be a finite number >= 0")
    return float(value)


def positive_float(name: str, value: float, null_ok: bool = False) -> float:
    """Return `value` as a float if it is finite and > 0, else raise ValueError naming it. `null_ok`:
    the setting may also be null (the caller handles None), which the message says."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name}={value!r}: must be a finite number > 0" + (" or null" if null_ok else ""))
    return float(value)


def interval(name: str, value: Sequence[float]) -> tuple[float, float]:
    """Return `(low, high)` if `value` is a pair with low <= high, else raise ValueError naming it."""
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not pair[0] <= pair[1]:
        raise ValueError(f"{name}={list(value)!r}: must be a pair [low, high] with low <= high")
    return pair[0], pair[1]


def one_of(name: str, value: str, options: Sequence[str]) -> str:
    """Return `value` if it is among `options`, else raise ValueError naming it and the options."""
    if value not in options:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(options)}")
    return value


def true_false_auto(name: str, value: bool | str) -> bool | str:
    """Return `value` if it is true, false or "auto", else raise ValueError naming it."""
    if value != "auto" and not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be true, false or auto")
    return value
