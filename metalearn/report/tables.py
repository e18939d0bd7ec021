"""The report's own table (report.md and report.csv) and the formatting of a metric's values."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from metalearn.report.runs import Row


def metric_scale(metric: str) -> tuple[float, str, int]:
    """Accuracies are shown in percent; returns and regrets with two decimals; other metrics as they are."""
    if metric.endswith("acc"):
        return 100.0, "%", 2
    return (1.0, "", 2) if "return" in metric or "regret" in metric else (1.0, "", 4)


def format_metric(value: float, metric: str) -> str:
    """`value` of `metric` as a table shows it (see `metric_scale`)."""
    factor, unit, digits = metric_scale(metric)
    return f"{value * factor:.{digits}f}{unit}"


def summarise(row: Row) -> dict[str, str]:
    """The printable cells of a row."""
    cells = {"experiment": row.experiment, "evaluation": row.evaluation, "seeds": str(len(row.values))}
    if row.values:
        factor, unit, digits = metric_scale(row.metric)
        mean = statistics.fmean(row.values)
        spread = statistics.stdev(row.values) if len(row.values) > 1 else math.nan
        cells["result"] = (f"{format_metric(mean, row.metric)}"
                           + (f" ± {spread * factor:.{digits}f}{unit} (std, {len(row.values)} seeds)"
                              if len(row.values) > 1 else f" ± {row.cis[0] * factor:.{digits}f}{unit} (95% CI)"))
        cells["per-run 95% CI"] = "; ".join(f"{v * factor:.{digits}f} ± {c * factor:.{digits}f}"
                                            for v, c in zip(row.values, row.cis, strict=True))
    status = [f"{len(row.values)} ok"] if row.values else []
    if row.failed:
        status.append(f"{len(row.failed)} failed ({'; '.join(dict.fromkeys(row.failed))})")
    if row.incomplete:
        status.append(f"{row.incomplete} incomplete")
    cells["status"] = ", ".join(status)
    if row.paper and row.paper.get("value") is not None and row.metric:
        paper = format_metric(float(row.paper["value"]), row.metric)
        if row.paper.get("ci95") is not None:
            paper += f" ± {format_metric(float(row.paper['ci95']), row.metric)}"
        cells["paper"] = f"{paper} ({row.paper['source']})" if row.paper.get("source") else paper
    return cells


COLUMNS = ("experiment", "{keys}", "evaluation", "seeds", "result", "per-run 95% CI", "paper", "status")


def table(rows: Sequence[Row], keys: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The header and the cells of the report's own table: varied settings as columns, a row each."""
    header = [c for name in COLUMNS for c in (keys if name == "{keys}" else [name])]
    body = []
    for row in rows:
        cells = {**summarise(row), **dict(zip(keys, row.settings, strict=True))}
        body.append([cells.get(name, "") for name in header])
    return header, body


def write_csv(rows: Sequence[Row], keys: Sequence[str], path: Path) -> None:
    """Machine-readable table: raw means (metric units), std, per-run values and CIs, status."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", *keys, "evaluation", "metric", "seeds", "mean", "std", "values", "ci95",
                         "failed", "incomplete", "paper", "paper_source", "runs"])
        for row in rows:
            mean = statistics.fmean(row.values) if row.values else ""
            std = statistics.stdev(row.values) if len(row.values) > 1 else ""
            paper = row.paper or {}
            writer.writerow([row.experiment, *row.settings, row.evaluation, row.metric, len(row.values), mean, std,
                             " ".join(map(str, row.values)), " ".join(map(str, row.cis)), len(row.failed),
                             row.incomplete, paper.get("value", ""), paper.get("source", ""),
                             " ".join(str(r.path) for r in row.runs)])


def markdown(rows: Sequence[Row], keys: Sequence[str]) -> str:
    """The report's own table (`table`) in Markdown, for report.md."""
    header, body = table(rows, keys)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"
