"""The status column of a results page: reproduced, budget-matched or open, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

from metalearn.reproduction import find_references, status

PAPER = {"value": 0.95, "source": "a paper"}


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _reference(root: Path, step: int, mean: float, ci: float, overrides: list[str], figure: bool = True) -> Path:
    root.mkdir(parents=True)
    curve = [{"step": step // 2, "val_acc": 0.5, "val_ci95": 0.01},
             {"step": step, "val_acc": 0.6, "val_ci95": 0.01, "test_acc": mean, "test_ci95": ci}]
    (root / "curve.json").write_text(json.dumps({"implementation": "scripts/reference.py reptile",
                                                 "experiment": "reptile_x", "overrides": overrides, "curve": curve}))
    if figure:
        (root / "curves.png").write_bytes(b"png")
    return root


def test_within_two_points_of_the_paper_is_reproduced_and_further_is_open(tmp_path: Path) -> None:
    row = {"step": 100, "experiment": "reptile_x", "overrides": {}, "references": [], "base": tmp_path,
           "fmt": _percent}
    assert status("query_acc", True, 0.9301, 0.01, paper=PAPER, **row) == "reproduced"
    assert status("query_acc", True, 0.97, 0.01, paper=PAPER, **row) == "reproduced"
    assert status("query_acc", True, 0.9299, 0.01, paper=PAPER, **row) == (
        "open: 2.01 points under the paper, no equal-budget reference yet")
    assert status("query_acc", True, 0.5, 0.01, paper=None, **row) == "— (no paper figure for this setting)"


def test_errors_and_returns_compare_by_interval_in_the_direction_the_run_recorded(tmp_path: Path) -> None:
    row = {"step": 100, "experiment": "e", "overrides": {}, "references": [], "base": tmp_path}
    mse = {"value": 0.5, "ci95": 0.1}
    assert status("query_mse", False, 0.3, 0.05, paper=mse, **row) == "reproduced"  # lower is better
    assert status("query_mse", False, 0.65, 0.05, paper=mse, **row) == "reproduced"  # 0.60 <= 0.60: overlapping
    assert status("query_mse", False, 0.7, 0.05, paper=mse, **row).startswith("open: 0.2 under the paper")
    assert status("query_return", True, -4.0, 0.5, paper={"value": -3.2}, **row).startswith("open: 0.8 under")
    assert status("query_return", True, -3.6, 0.5, paper={"value": -3.2}, **row) == "reproduced"


def test_a_reference_at_the_same_budget_matches_or_reveals_a_gap(tmp_path: Path) -> None:
    """Only a reference of the same experiment, overrides and meta-steps counts; overlapping intervals
    are budget-matched with the curves linked from the page's directory, a clearly better reference is
    an open defect, and one still training (no test point) is not a reference."""
    runs = tmp_path / "runs"
    _reference(runs / "reptile_x" / "reference", 2000, 0.80, 0.01, ["trainer.max_steps=2000"])
    _reference(runs / "reptile_x" / "reference-other-steps", 1000, 0.80, 0.01, ["trainer.max_steps=1000"])
    unfinished = runs / "reptile_x" / "training"
    unfinished.mkdir()
    (unfinished / "curve.json").write_text(json.dumps({"implementation": "i", "experiment": "reptile_x",
                                                       "overrides": [], "curve": [{"step": 5, "val_acc": 0.2}]}))
    references = find_references([runs])
    assert sorted(r.step for r in references) == [1000, 2000]
    row = {"step": 2000, "experiment": "reptile_x", "overrides": {"trainer.max_steps": "2000"},
           "references": references, "base": tmp_path / "docs", "fmt": _percent, "paper": PAPER}
    assert status("query_acc", True, 0.785, 0.01, **row) == (
        "budget-matched (scripts/reference.py reptile: 80.00% ± 1.00% at 2,000 steps) "
        "([curves](../runs/reptile_x/reference/curves.png))")
    assert status("query_acc", True, 0.70, 0.01, **row) == (
        "open: an independent implementation tests higher at the same budget "
        "(scripts/reference.py reptile: 80.00% ± 1.00% at 2,000 steps)")
    assert status("query_acc", True, 0.70, 0.01, **{**row, "step": 3000}).startswith("open: 25.00 points under")
    assert status("query_acc", True, 0.70, 0.01, **{**row, "overrides": {}}).startswith("open: 25.00 points under")
