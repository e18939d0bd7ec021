"""The `metalearn-report` command: one table (Markdown and CSV) and curve plots from many runs.

    metalearn-report outputs/multiruns/maml_sinusoid/2026-11-26_01-09-23 --out report/

Every directory below the given paths that holds a run's `config.yaml` or a failed job's `failed.json`
is a run: finished (`results.json`), failed (`failed.json`, written by a failing multirun job) or
incomplete. Runs are grouped by experiment and by the command-line overrides that vary between runs
(from Hydra's `.hydra/overrides.yaml`), seeds pooled: each row gives the mean ± standard deviation
across seeds, each run's own 95% confidence interval, and the paper figure when the experiment config
names one (`paper.value`, `paper.source`: from metalearn's own experiment config, where corrections to a
paper's figure land, else from the run's saved config). Evaluations written by `metalearn-eval`
(`eval_*.json`) are rows of their own. Curves of the training meta-loss and the validation metric are
read back from the TensorBoard event files and drawn with matplotlib, one line per configuration, seeds
as a band.

Results pages: `--page docs/results.md` rewrites the tables between marker comments of a Markdown page
from the runs, leaving the prose around them alone, so that every figure in the tables comes from a
run's files:

    <!-- metalearn-report: maml_sinusoid_paper fomaml_* -->            test results, one row per run setting
    <!-- metalearn-report validation: maml_omniglot_5w1s_quick -->     validation metric at each validation
    <!-- metalearn-report metrics 0=query_return_step0 1=...: maml_rl_* --> chosen test metrics as columns
    <!-- /metalearn-report -->                                          (ends a block)

The words after the colon are experiment names (shell patterns, rows in their order). `--check` only
says whether the page is up to date. `--archive DIR` copies the runs' small files (config, overrides,
results, evaluations, event files, pictures, logs; not checkpoints) to DIR/<experiment>/<run>, so a
page can be rebuilt from a repository. A `time.log` in a run directory (the output of
`/usr/bin/time -v metalearn ...`) adds the command's wall time and peak memory. Results tables end with
each row's status against its paper: reproduced, budget-matched against an independent implementation
(the `curve.json` of `scripts/reference.py`, archived below the same paths) or open, with the reason
(metalearn.reproduction).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import functools
import json
import math
import re
import shutil
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metalearn import reproduction
from metalearn.reproduction import Reference, find_references
from metalearn.stats import recorded_ci95

# Overrides that name where or how a run ran, not what it computed; never report columns.
NOT_SETTINGS = ("seed", "experiment", "ckpt_path", "trainer.progress", "trainer.resume", "trainer.device",
                "trainer.compile", "trainer.allocator", "paths.", "hydra.", "logger.")
# Overrides left out of the command a results page shows: they change nothing a reader would repeat.
QUIET_OVERRIDES = ("trainer.progress",)
LOSS_TAIL = 10  # logged training losses averaged for a results page (one step's loss is noisy)
# What --archive copies from a run directory (everything small a report or a reader needs).
ARCHIVED = ("config.yaml", ".hydra/overrides.yaml", "results.json", "failed.json", "eval_*.json",
            "events.out.tfevents.*", "*.png", "train.log", "time.log")


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

    @property
    def command(self) -> str:
        """The command line that made the run, without the overrides that only say where or how it ran."""
        kept = [f"{k}={v}" for k, v in self.overrides.items() if k not in QUIET_OVERRIDES]
        return " ".join(["metalearn", *kept])

    def timing(self) -> dict[str, float]:
        """Wall time (s) and peak resident memory (MiB) of the whole command, from `time.log` if there is one."""
        try:
            text = (self.path / "time.log").read_text()
        except OSError:
            return {}
        out: dict[str, float] = {}
        if wall := re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text):
            out["wall_s"] = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.group(1).split(":"))))
        if rss := re.search(r"Maximum resident set size \(kbytes\): (\d+)", text):
            out["peak_mib"] = int(rss.group(1)) / 1024
        return out


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


@functools.cache
def shipped_paper(experiment: str) -> dict[str, Any] | None:
    """The `paper:` figure of metalearn's own `experiment=<experiment>` config (a fact about the paper, so
    the shipped config's, corrections included, serves archived runs too); None if there is no such
    experiment or it names no figure."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from metalearn.train import CONFIG_DIR

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            config = compose(config_name="train", overrides=[f"experiment={experiment}"])
    except HydraException:
        return None
    paper = OmegaConf.to_container(config.get("paper")) if config.get("paper") is not None else None
    return {str(k): v for k, v in paper.items()} if isinstance(paper, dict) else None


def build_rows(runs: Sequence[Run], keys: Sequence[str]) -> list[Row]:
    """Group runs into rows: per experiment and varied settings, the run's own test and each metalearn-eval setting."""
    rows: dict[tuple[str, tuple[str, ...], str], Row] = {}

    def row(run: Run, evaluation: str, own_setting: bool = True) -> Row:
        settings = tuple(run.overrides.get(k, "—") for k in keys)
        key = (run.experiment, settings, evaluation)
        if key not in rows:  # the paper's figure is for the experiment's own test setting
            paper = (shipped_paper(run.experiment) or run.config.get("paper")) if own_setting else None
            rows[key] = Row(run.experiment, settings, evaluation, paper=paper)
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
        target.cis.append(_ci95(run.results, run.results["test"], metric))
        for result in run.evals:
            extra = row(run, _evaluation_label(result), own_setting=not result.get("overrides"))
            extra.runs.append(run)
            extra.metric = result["metric"]
            extra.values.append(float(result["mean"]))
            extra.cis.append(recorded_ci95(float(result["ci95"]), int(result["episodes"]), result.get("interval")))
    return list(rows.values())


def _ci95(results: dict[str, Any], split: dict[str, Any], name: str) -> float:
    """The 95% half-width of `name` in a results.json split, on Student's t (see `recorded_ci95`)."""
    return recorded_ci95(float(split[f"{name}_ci95"]), int(split.get("tasks", 600)), results.get("interval"))


def _scale(metric: str) -> tuple[float, str, int]:
    """Accuracies are shown in percent; returns and regrets with two decimals; other metrics as they are."""
    if metric.endswith("acc"):
        return 100.0, "%", 2
    return (1.0, "", 2) if "return" in metric or "regret" in metric else (1.0, "", 4)


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
                               base, fmt=lambda v: _fmt(v, row.metric))


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
            evals = [e for r in row.runs for e in r.evals if _evaluation_label(e) == row.evaluation]
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
        before = _fmt(statistics.fmean(pre), row.metric) if pre else "—"
        if not row.evaluation.startswith("test (end"):
            budget, train_time, whole = "—", "—", "—"  # an evaluation of a run listed on its own line
        line = [_row_label(row, keys), f"`{command}`", budget or "—", result, before, train_time, whole,
                cells.get("paper", "—"), row_status(row, references, base)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |")
    return "\n".join(lines) + "\n"


def _series(steps: Sequence[int], values: Sequence[float], metric: str) -> str:
    factor, _, digits = _scale(metric)
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
            factor, unit, digits = _scale(name)
            if len(values) > 1:
                spread = f" ± {statistics.stdev(values) * factor:.{digits}f}{unit} (std)"
            else:
                spread = f" ± {_ci95(finished[0], finished[0]['test'], name) * factor:.{digits}f}{unit}"
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


def archive(runs: Sequence[Run], dest: Path) -> list[Path]:
    """Copy the small files of `runs` (ARCHIVED; no checkpoints) to dest/<experiment>/<run>; the new directories."""
    written = []
    for run in runs:
        name = f"{run.path.parent.name}_{run.path.name}" if run.path.name.isdigit() else run.path.name
        target = dest / run.experiment / name
        if target.resolve() == run.path.resolve():
            continue
        for pattern in ARCHIVED:
            for source in run.path.glob(pattern):
                (target / source.relative_to(run.path)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / source.relative_to(run.path))
        written.append(target)
    return written


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
                several = len({r.metric for r in groups}) > 1  # runs of several metrics: a meta-loss plot each
                name = tag.replace("/", "_") + (f"_{metric}" if several and tag.startswith("train/") else "")
                path = out / f"curves_{name}.png"
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
    parser.add_argument("--page", type=Path, default=None,
                        help="a Markdown page whose metalearn-report blocks are rebuilt from the runs")
    parser.add_argument("--check", action="store_true",
                        help="with --page: write nothing, exit 1 if the page's tables differ from the runs")
    parser.add_argument("--archive", type=Path, default=None,
                        help="copy the runs' small files (not checkpoints) to ARCHIVE/<experiment>/<run> and stop")
    args = parser.parse_args(argv)
    try:
        if args.archive is not None:
            copied = archive(find_runs(args.paths), args.archive)
            print("\n".join(map(str, copied)) + f"\n{len(copied)} runs archived to {args.archive}")
            return
        if args.page is not None and args.check:
            runs = find_runs(args.paths)
            keys = varied_keys(runs)
            text = args.page.read_text()
            if update_page(text, build_rows(runs, keys), keys, str(args.page), find_references(args.paths),
                           args.page.parent) != text:
                print(f"error: {args.page} is out of date: run metalearn-report {' '.join(map(str, args.paths))} "
                      f"--page {args.page}", file=sys.stderr)
                sys.exit(1)
            print(f"{args.page} is up to date ({len(runs)} runs)")
            return
        out = args.out or args.paths[0] / "report"
        result = report(args.paths, out, curves=not args.no_curves)
        if args.page is not None:
            args.page.write_text(update_page(args.page.read_text(), result["rows"], result["keys"], str(args.page),
                                             find_references(args.paths), args.page.parent))
    except (FileNotFoundError, ValueError) as ex:
        print(f"error: {ex}", file=sys.stderr)
        sys.exit(2)
    print(result["markdown"], end="")
    failed = sum(r.status == "failed" for r in result["runs"])
    print(f"\n{len(result['runs'])} runs ({failed} failed) -> {out / 'report.md'}, {out / 'report.csv'}"
          + "".join(f", {p}" for p in result["pictures"]) + (f", {args.page}" if args.page else ""))


if __name__ == "__main__":
    main()
