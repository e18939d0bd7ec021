"""The `metalearn-report` command: one table (Markdown and CSV) and curve plots from many runs.

    metalearn-report outputs/multiruns/maml_sinusoid/2026-11-26_01-09-23 --out report/

Every directory below the given paths that holds a run's `config.yaml` or a failed job's `failed.json`
is a run: finished (`results.json`), failed (`failed.json`, written by a failing multirun job) or
incomplete. Runs are
grouped by experiment and by the command-line overrides that vary between runs (from Hydra's
`.hydra/overrides.yaml`), seeds pooled: each row gives the mean ± standard deviation across seeds,
each run's own 95% confidence interval, and the paper figure when the experiment config names one
(`paper.value`, `paper.source`). Evaluations written by `metalearn-eval` (`eval_*.json`) are rows of
their own. Curves of the training meta-loss and the validation metric are read back from the
TensorBoard event files and drawn with matplotlib, one line per configuration, seeds as a band.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# Overrides that name where or how a run ran, not what it computed; never report columns.
NOT_SETTINGS = ("seed", "experiment", "ckpt_path", "trainer.progress", "trainer.resume", "trainer.device", "paths.",
                "hydra.", "logger.")


@dataclass
class Run:
    """One run directory and what it produced."""

    path: Path
    config: dict[str, Any]
    overrides: dict[str, str]
    results: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def experiment(self) -> str:
        name = self.config.get("name") or (self.failure or {}).get("experiment")
        return str(name or self.path.parent.name)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def status(self) -> str:
        return "ok" if self.results else "failed" if self.failure else "incomplete"


@dataclass
class Row:
    """A configuration (experiment + varied overrides) under one evaluation, seeds pooled."""

    experiment: str
    settings: tuple[str, ...]
    evaluation: str
    metric: str = ""
    runs: list[Run] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    cis: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    incomplete: int = 0
    paper: dict[str, Any] | None = None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _overrides(run_dir: Path) -> dict[str, str]:
    """`key -> value` of the run's command-line overrides (`+key`/`++key` as `key`)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for line in OmegaConf.to_container(OmegaConf.load(path)) or []:  # type: ignore[union-attr]
        key, _, value = str(line).partition("=")
        out[key.lstrip("+~")] = value
    return out


def find_runs(paths: Iterable[Path]) -> list[Run]:
    """Every run directory below `paths` (a directory with `config.yaml` that is not Hydra's `.hydra`)."""
    runs: dict[Path, Run] = {}
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such directory")
        # A job that failed before writing its config still left failed.json.
        markers = [p for name in ("config.yaml", "failed.json") for p in root.rglob(name)]  # root's own too
        for run_dir in sorted({p.parent for p in markers if p.parent.name != ".hydra"}):
            if run_dir.resolve() in runs:
                continue
            config_file = run_dir / "config.yaml"
            loaded = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else {}
            config: dict[str, Any] = {str(k): v for k, v in loaded.items()} if isinstance(loaded, dict) else {}
            run = Run(run_dir, config, _overrides(run_dir), _read_json(run_dir / "results.json"),
                      _read_json(run_dir / "failed.json"))
            run.evals = [e for p in sorted(run_dir.glob("eval_*.json")) if (e := _read_json(p)) is not None]
            runs[run_dir.resolve()] = run
    return sorted(runs.values(), key=lambda r: (r.experiment, str(r.path)))


def varied_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose values differ between the runs of an experiment (seed and paths excluded)."""
    keys: set[str] = set()
    by_experiment: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_experiment[run.experiment].append(run)
    for group in by_experiment.values():
        for key in {k for r in group for k in r.overrides}:
            if key.startswith(NOT_SETTINGS) or key in NOT_SETTINGS:
                continue
            if len({r.overrides.get(key) for r in group}) > 1:
                keys.add(key)
    return sorted(keys)


def _evaluation_label(result: dict[str, Any]) -> str:
    label = f"{result['split']}, {result['episodes']} episodes"
    return f"{label}, {' '.join(result['overrides'])}" if result.get("overrides") else label


def build_rows(runs: Sequence[Run], keys: Sequence[str]) -> list[Row]:
    """Group runs into rows: per experiment and varied settings, the run's own test and each metalearn-eval setting."""
    rows: dict[tuple[str, tuple[str, ...], str], Row] = {}

    def row(run: Run, evaluation: str) -> Row:
        settings = tuple(run.overrides.get(k, "—") for k in keys)
        key = (run.experiment, settings, evaluation)
        if key not in rows:
            rows[key] = Row(run.experiment, settings, evaluation, paper=run.config.get("paper") or None)
        return rows[key]

    for run in runs:
        target = row(run, "test (end of training)")
        target.runs.append(run)
        if run.results is None:
            if run.failure is not None:
                target.failed.append(f"{run.failure.get('error', 'error')}: {run.failure.get('message', '')}")
            else:
                target.incomplete += 1
            continue
        metric = run.results["metric"]
        target.metric = metric
        target.values.append(float(run.results["test"][metric]))
        target.cis.append(float(run.results["test"][f"{metric}_ci95"]))
        for result in run.evals:
            extra = row(run, _evaluation_label(result))
            extra.runs.append(run)
            extra.metric = result["metric"]
            extra.values.append(float(result["mean"]))
            extra.cis.append(float(result["ci95"]))
    return list(rows.values())


def _scale(metric: str) -> tuple[float, str, int]:
    """Accuracies are shown in percent; other metrics as they are."""
    return (100.0, "%", 2) if metric.endswith("acc") else (1.0, "", 4)


def _fmt(value: float, metric: str) -> str:
    factor, unit, digits = _scale(metric)
    return f"{value * factor:.{digits}f}{unit}"


def summarise(row: Row) -> dict[str, str]:
    """The printable cells of a row."""
    cells = {"experiment": row.experiment, "evaluation": row.evaluation, "seeds": str(len(row.values))}
    if row.values:
        factor, unit, digits = _scale(row.metric)
        mean = statistics.fmean(row.values)
        spread = statistics.stdev(row.values) if len(row.values) > 1 else math.nan
        cells["result"] = (f"{_fmt(mean, row.metric)}" + (f" ± {spread * factor:.{digits}f}{unit} (std, "
                           f"{len(row.values)} seeds)" if len(row.values) > 1 else
                           f" ± {row.cis[0] * factor:.{digits}f}{unit} (95% CI)"))
        cells["per-run 95% CI"] = "; ".join(f"{v * factor:.{digits}f} ± {c * factor:.{digits}f}"
                                            for v, c in zip(row.values, row.cis, strict=True))
    status = [f"{len(row.values)} ok"] if row.values else []
    if row.failed:
        status.append(f"{len(row.failed)} failed ({'; '.join(dict.fromkeys(row.failed))})")
    if row.incomplete:
        status.append(f"{row.incomplete} incomplete")
    cells["status"] = ", ".join(status)
    if row.paper and row.paper.get("value") is not None and row.metric:
        paper = _fmt(float(row.paper["value"]), row.metric)
        if row.paper.get("ci95") is not None:
            paper += f" ± {_fmt(float(row.paper['ci95']), row.metric)}"
        cells["paper"] = f"{paper} ({row.paper['source']})" if row.paper.get("source") else paper
    return cells


COLUMNS = ("experiment", "{keys}", "evaluation", "seeds", "result", "per-run 95% CI", "paper", "status")


def table(rows: Sequence[Row], keys: Sequence[str]) -> tuple[list[str], list[list[str]]]:
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
    header, body = table(rows, keys)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def read_curve(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """A scalar series from the run's TensorBoard event files (all of them: a resumed run has several)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            points.update((e.step, e.value) for e in accumulator.Scalars(tag))  # later files win (resume)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_curves(rows: Sequence[Row], keys: Sequence[str], out: Path) -> list[Path]:
    """One PNG per (tag, metric): the training meta-loss and the validation metric against step, a line
    per configuration (the mean over its seeds at the steps they share) and a min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [r for r in rows if r.evaluation.startswith("test (end") and r.values]
    written: list[Path] = []
    for metric in sorted({r.metric for r in groups}):
        for tag in ("train/meta_loss", f"val/{metric}"):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            drawn = False
            for row in (r for r in groups if r.metric == metric):
                curves = [read_curve(run.path, tag) for run in row.runs if run.results is not None]
                curves = [c for c in curves if c[0]]
                if not curves:
                    continue
                common = sorted(set.intersection(*(set(s) for s, _ in curves)))
                if not common:
                    continue
                stacked = [[dict(zip(s, v, strict=True))[step] for step in common] for s, v in curves]
                mean = [statistics.fmean(col) for col in zip(*stacked, strict=True)]
                label = " ".join([row.experiment, *(f"{k}={v}" for k, v in zip(keys, row.settings, strict=True))])
                (line,) = ax.plot(common, mean, label=f"{label} ({len(curves)} runs)" if len(curves) > 1 else label)
                if len(curves) > 1:
                    low = [min(col) for col in zip(*stacked, strict=True)]
                    high = [max(col) for col in zip(*stacked, strict=True)]
                    ax.fill_between(common, low, high, color=line.get_color(), alpha=0.2)
                drawn = True
            if drawn:
                ax.set_xlabel("meta-step")
                ax.set_ylabel(tag)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
                path = out / f"curves_{tag.replace('/', '_')}.png"
                fig.tight_layout()
                fig.savefig(path, dpi=100)
                written.append(path)
            plt.close(fig)
    return written


def report(paths: Sequence[Path], out: Path, curves: bool = True) -> dict[str, Any]:
    """Gather the runs below `paths` and write report.md, report.csv and the curve PNGs to `out`."""
    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"{', '.join(map(str, paths))}: no runs found (no config.yaml below)")
    keys = varied_keys(runs)
    rows = build_rows(runs, keys)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, keys)
    (out / "report.md").write_text(text)
    write_csv(rows, keys, out / "report.csv")
    pictures = plot_curves(rows, keys, out) if curves else []
    return {"runs": runs, "rows": rows, "keys": keys, "markdown": text, "pictures": pictures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="metalearn-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="outputs/, a multirun directory or run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md, report.csv and the curves go (default: <first path>/report)")
    parser.add_argument("--no-curves", action="store_true", help="skip reading event files and drawing curves")
    args = parser.parse_args(argv)
    out = args.out or args.paths[0] / "report"
    try:
        result = report(args.paths, out, curves=not args.no_curves)
    except FileNotFoundError as ex:
        print(f"error: {ex}", file=sys.stderr)
        sys.exit(2)
    print(result["markdown"], end="")
    failed = sum(r.status == "failed" for r in result["runs"])
    print(f"\n{len(result['runs'])} runs ({failed} failed) -> {out / 'report.md'}, {out / 'report.csv'}"
          + "".join(f", {p}" for p in result["pictures"]))


if __name__ == "__main__":
    main()
