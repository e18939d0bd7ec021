"""A results page's tables, rebuilt from runs by `update_page`.

`update_page` rewrites the tables between marker comments of a Markdown page (`metalearn-report --page
docs/results.md`), leaving the prose around them alone, so that every figure in the tables comes from a
run's files:

    <!-- metalearn-report: maml_sinusoid_paper fomaml_* -->            test results, one row per run setting
    <!-- metalearn-report validation: maml_omniglot_5w1s_quick -->     validation metric at each validation
    <!-- metalearn-report metrics 0=query_return_step0 1=...: maml_rl_* --> chosen test metrics as columns
    <!-- /metalearn-report -->                                          (ends a block)

The words after the colon are experiment names (shell patterns, rows in their order). A run's
`time.log` adds the command's wall time and peak memory. Results tables end with each row's status
against its paper: reproduced, budget-matched against an independent implementation (the `curve.json`
of `scripts/reference.py`, archived below the same paths) or open, with the reason
(metalearn.reproduction).
"""

from __future__ import annotations

import fnmatch
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalearn import reproduction
from metalearn.report.curves import read_curve
from metalearn.report.runs import NOT_SETTINGS, Row, evaluation_label, results_ci95
from metalearn.report.tables import format_metric, metric_scale, summarise
from metalearn.reproduction import Reference

LOSS_TAIL = 10  # logged training losses averaged for a results page (one step's loss is noisy)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _steps(step: int) -> str:
    return f"{step:,}"


def _row_label(row: Row, keys: Sequence[str]) -> str:
    label = " ".join([row.experiment, *(f"{k}={v}" for k, v in zip(keys, row.settings, strict=True) if v != "—")])
    if len(row.runs) > 1:
        label += f" (seeds {', '.join(str(r.seed) for r in row.runs)})"
    return label if row.evaluation.startswith("test (end") else f"{label}; {row.evaluation}"


def _eval_command(result: dict[str, Any]) -> str:
    parts = ["metalearn-eval ckpt_path=<run>"]
    parts += [f"eval.split={result['split']}"] if result.get("split") != "test" else []
    parts += [f"eval.episodes={result['episodes']}"] if result.get("episodes") != 600 else []
    return " ".join(parts + list(result.get("overrides") or []))


def row_status(row: Row, references: Sequence[Reference], base: Path) -> str:
    """Whether `row` reproduces its paper (see metalearn.reproduction); links relative to `base`."""
    finished = [r for r in row.runs if r.results is not None]
    if not row.values or not finished:
        return "—"
    run = finished[0]
    assert run.results is not None
    overrides = {k: v for k, v in run.overrides.items() if not (k.startswith(NOT_SETTINGS) or k in NOT_SETTINGS)}
    return reproduction.status(row.metric, bool(run.results.get("higher_is_better", True)),
                               statistics.fmean(row.values), statistics.fmean(row.cis),
                               int(run.results["step"]), row.experiment, overrides, row.paper, list(references),
                               base, fmt=lambda v: format_metric(v, row.metric))


def page_table(rows: Sequence[Row], keys: Sequence[str], references: Sequence[Reference] = (),
               base: Path = Path(".")) -> str:
    """Test results for a results page: one line per row, with the command that made it, its budget, the
    metric before adaptation, training time (results.json), the whole command's time and memory (time.log)
    and whether it reproduces its paper (`row_status`)."""
    header = ["run", "command", "meta-steps", "test result", "before adaptation", "training time",
              "whole command, peak memory", "paper figure", "status"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        cells = summarise(row)
        finished = [r for r in row.runs if r.results is not None]
        first = row.runs[0]
        if row.evaluation.startswith("test (end"):
            command = first.command if len(row.runs) == 1 else " ".join(
                part for part in first.command.split() if not part.startswith("seed="))
            pre = [float(r.results["test"][f"{row.metric}_pre"]) for r in finished if r.results
                   and f"{row.metric}_pre" in r.results["test"]]
        else:
            evals = [e for r in row.runs for e in r.evals if evaluation_label(e) == row.evaluation]
            command = _eval_command(evals[0])
            pre = [float(e["summary"][f"{row.metric}_pre"]) for e in evals if f"{row.metric}_pre" in e["summary"]]
        results = [r.results for r in finished if r.results]
        steps = sorted({int(r["step"]) for r in results})
        best = sorted({int(r.get("best_step", r["step"])) for r in results})
        budget = "/".join(map(_steps, steps)) + (f" (best {'/'.join(map(_steps, best))})" if best != steps else "")
        timings = [r.timing() for r in finished]
        whole = "; ".join(f"{_duration(t['wall_s'])}, {t['peak_mib']:,.0f} MiB" for t in timings if t) or "—"
        train_time = "; ".join(_duration(float(r["wall_time_s"])) for r in results if "wall_time_s" in r) or "—"
        result = f"**{cells['result']}**" if "result" in cells else cells["status"]
        before = format_metric(statistics.fmean(pre), row.metric) if pre else "—"
        if not row.evaluation.startswith("test (end"):
            budget, train_time, whole = "—", "—", "—"  # an evaluation of a run listed on its own line
        line = [_row_label(row, keys), f"`{command}`", budget or "—", result, before, train_time, whole,
                cells.get("paper", "—"), row_status(row, references, base)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |")
    return "\n".join(lines) + "\n"


def _series(steps: Sequence[int], values: Sequence[float], metric: str) -> str:
    factor, _, digits = metric_scale(metric)
    shown = [f"{v * factor:.{max(digits - 1, 1)}f}" for v in values]
    gaps = {b - a for a, b in zip(steps, steps[1:], strict=False)}
    if len(steps) > 2 and len(gaps) == 1:
        return f"steps {_steps(steps[0])} … {_steps(steps[-1])}, every {_steps(gaps.pop())}: {', '.join(shown)}"
    return ", ".join(f"{v} ({_steps(s)})" for s, v in zip(steps, shown, strict=True))


def validation_table(rows: Sequence[Row], keys: Sequence[str]) -> str:
    """The validation metric of each run at every validation, read from its event files."""
    lines = ["| run | validation (mean over the validation tasks) | best checkpoint | training meta-loss at the end |",
             "| --- | --- | --- | --- |"]
    for row in rows:
        if not row.evaluation.startswith("test (end"):
            continue
        for run in (r for r in row.runs if r.results is not None):
            assert run.results is not None
            steps, values = read_curve(run.path, f"val/{row.metric}")
            seed = f" (seed {run.seed})" if len(row.runs) > 1 else ""
            label = _row_label(Row(row.experiment, row.settings, row.evaluation, runs=[run]), keys) + seed
            series = f"{row.metric}, " + _series(steps, values, row.metric) if steps else "—"
            best = _steps(int(run.results.get("best_step", run.results["step"])))
            _, losses = read_curve(run.path, "train/meta_loss")
            tail = losses[-LOSS_TAIL:]
            loss = f"{statistics.fmean(tail):.4g} (mean of the last {len(tail)} logged)" if tail else "—"
            lines.append(f"| {label} | {series} | step {best} | {loss} |")
    return "\n".join(lines) + "\n"


def metrics_table(rows: Sequence[Row], keys: Sequence[str], columns: Sequence[str],
                  references: Sequence[Reference] = (), base: Path = Path(".")) -> str:
    """Chosen test metrics of each configuration, one column each: `label=name|other` takes the first of
    the names the run's results.json has (different methods name the same quantity differently)."""
    labels = [c.partition("=")[0] for c in columns]
    lines = ["| " + " | ".join(["run", "command", *labels, "paper figure", "status"]) + " |",
             "| " + " | ".join("---" for _ in range(len(labels) + 4)) + " |"]
    for row in rows:
        finished = [r.results for r in row.runs if r.results is not None]
        if not row.evaluation.startswith("test (end") or not finished:
            continue
        cells = []
        for column in columns:
            names = (column.partition("=")[2] or column).split("|")
            name = next((n for n in names if n in finished[0]["test"]), None)
            if name is None:
                cells.append("—")
                continue
            values = [float(r["test"][name]) for r in finished]
            factor, unit, digits = metric_scale(name)
            if len(values) > 1:
                spread = f" ± {statistics.stdev(values) * factor:.{digits}f}{unit} (std)"
            else:
                ci = results_ci95(finished[0], finished[0]["test"], name)
                spread = f" ± {ci * factor:.{digits}f}{unit}"
            cells.append(f"{statistics.fmean(values) * factor:.{digits}f}{unit}{spread}")
        command = row.runs[0].command
        line = [_row_label(row, keys), f"`{command}`", *cells, summarise(row).get("paper", "—"),
                row_status(row, references, base)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |")
    return "\n".join(lines) + "\n"


PAGE_BLOCK = re.compile(r"(<!-- metalearn-report( [^:>]*)?: ([^>]*?) -->\n)(.*?)(<!-- /metalearn-report -->)",
                        re.DOTALL)


def update_page(text: str, rows: Sequence[Row], keys: Sequence[str], name: str = "page",
                references: Sequence[Reference] = (), base: Path = Path(".")) -> str:
    """`text` with the table of every `metalearn-report` block rebuilt from `rows` (see the module doc);
    `references`: the independent runs a row's status compares with; `base`: the page's directory."""

    def fill(match: re.Match[str]) -> str:
        patterns = match.group(3).split()
        chosen: list[Row] = []
        for pattern in patterns:
            chosen += sorted((r for r in rows if fnmatch.fnmatchcase(r.experiment, pattern) and r not in chosen),
                             key=lambda r: (r.experiment, not r.evaluation.startswith("test (end"),
                                            [v != "—" for v in r.settings], r.settings, r.evaluation))
        if not chosen:
            raise ValueError(f"{name}: the block '{match.group(1).strip()}' matches no run")
        kind = (match.group(2) or "").split()
        if not kind:
            table_text = page_table(chosen, keys, references, base)
        elif kind[0] == "validation":
            table_text = validation_table(chosen, keys)
        elif kind[0] == "metrics" and len(kind) > 1:
            table_text = metrics_table(chosen, keys, kind[1:], references, base)
        else:
            raise ValueError(f"{name}: the block '{match.group(1).strip()}' is neither a results table, "
                             "'validation' nor 'metrics <label=metric> ...'")
        return match.group(1) + table_text + match.group(5)

    return PAGE_BLOCK.sub(fill, text)
