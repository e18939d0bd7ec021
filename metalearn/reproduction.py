"""Whether a results row reproduces its paper: the status column of a results page.

A row's status is one of
- **reproduced**: the test result is within 2 points of the paper's accuracy or above it; for other
  metrics, it is no worse than the paper's figure beyond the two intervals, in the direction the run
  recorded (`higher_is_better` of results.json);
- **budget-matched**: an independent implementation trained on the same experiment, overrides and number
  of meta-steps (`scripts/reference.py`, whose `curve.json` is archived beside the runs) tests within the
  row's interval: their 95% intervals overlap on the same test tasks. Its figure of both validation
  curves is linked;
- **open**, with the reason: short of the paper with no equal-budget reference, or a reference that
  tests clearly better at the same budget (a defect to find).
A row whose setting has no paper figure and no reference says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCURACY_TOLERANCE = 0.02  # "reproduced": within 2 points of a paper's accuracy
FIGURE = "curves.png"  # what `scripts/reference.py compare` writes beside curve.json


@dataclass(frozen=True)
class Reference:
    """An independent implementation's run (`curve.json` of scripts/reference.py) and its final test."""

    path: Path
    implementation: str
    experiment: str
    overrides: tuple[tuple[str, str], ...]
    step: int
    mean: float
    ci95: float

    @property
    def figure(self) -> Path | None:
        figure = self.path / FIGURE
        return figure if figure.is_file() else None


def find_references(paths: list[Path]) -> list[Reference]:
    """Every finished reference run (`curve.json` whose last point has a test accuracy) below `paths`."""
    found = []
    for root in paths:
        for file in sorted(root.rglob("curve.json")):
            try:
                data: dict[str, Any] = json.loads(file.read_text())
                last = data["curve"][-1]
                overrides = tuple(sorted(_pair(str(o)) for o in data["overrides"]))
                found.append(Reference(file.parent, str(data["implementation"]), str(data["experiment"]), overrides,
                                       int(last["step"]), float(last["test_acc"]), float(last["test_ci95"])))
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                continue  # not a reference run, or one still training
    return found


def _pair(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def overlap(mean: float, ci: float, other: float, other_ci: float) -> bool:
    """Whether the intervals mean ± ci and other ± other_ci overlap."""
    return abs(mean - other) <= ci + other_ci


def _short_of_paper(metric: str, higher_is_better: bool, mean: float, ci: float,
                    paper: dict[str, Any]) -> float | None:
    """How far the result falls short of the paper beyond the tolerance (None: it reproduces it)."""
    value, paper_ci = float(paper["value"]), float(paper.get("ci95") or 0.0)
    if metric.endswith("acc"):
        return None if mean >= value - ACCURACY_TOLERANCE else value - mean
    if higher_is_better:
        return None if mean + ci >= value - paper_ci else value - mean
    return None if mean - ci <= value + paper_ci else mean - value


def status(metric: str, higher_is_better: bool, mean: float, ci: float, step: int, experiment: str,
           overrides: dict[str, str], paper: dict[str, Any] | None, references: list[Reference], base: Path,
           fmt: Callable[[float], str] = lambda v: f"{v:.4g}") -> str:
    """The status cell of one row: a test result `mean ± ci` of `metric` (`higher_is_better` as the run
    recorded it) after `step` meta-steps of `experiment` run with `overrides`, against its paper figure
    and the references of the same budget. `base`: the directory links are made relative to; `fmt`
    prints a value of the metric."""
    paper = paper if paper and paper.get("value") is not None else None
    short = _short_of_paper(metric, higher_is_better, mean, ci, paper) if paper is not None else None
    if paper is not None and short is None:
        return "reproduced"
    key = tuple(sorted(overrides.items()))
    for reference in (r for r in references if (r.experiment, r.overrides, r.step) == (experiment, key, step)):
        what = f"{reference.implementation}: {fmt(reference.mean)} ± {fmt(reference.ci95)} at {step:,} steps"
        if overlap(mean, ci, reference.mean, reference.ci95):
            figure = reference.figure
            link = f" ([curves]({os.path.relpath(figure.resolve(), base.resolve())}))" if figure else ""
            return f"budget-matched ({what}){link}"
        if (reference.mean > mean) == higher_is_better:
            return f"open: an independent implementation tests higher at the same budget ({what})"
    if short is None:  # no paper figure: the result was not short of one
        return "— (no paper figure for this setting)"
    gap = f"{100 * short:.2f} points" if metric.endswith("acc") else fmt(short)
    return f"open: {gap} under the paper, no equal-budget reference yet"
