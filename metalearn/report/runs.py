"""Run directories and the rows of a report: finding runs, grouping them by setting, archiving them.

A run is a directory with a run's `config.yaml` or a failed job's `failed.json`: finished
(`results.json`), failed (`failed.json`, written by a failing multirun job) or incomplete. Rows group the
runs of an experiment by the command-line overrides that vary between them (Hydra's
`.hydra/overrides.yaml`), seeds pooled; evaluations written by `metalearn-eval` (`eval_*.json`) are rows
of their own. A `time.log` in a run directory (the output of `/usr/bin/time -v metalearn ...`) gives
the command's wall time and peak memory.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metalearn.stats import recorded_ci95

# Overrides that name where or how a run ran, not what it computed; never report columns.
NOT_SETTINGS = ("seed", "experiment", "ckpt_path", "trainer.progress", "trainer.resume", "trainer.device",
                "trainer.compile", "trainer.allocator", "paths.", "hydra.", "logger.")
# Overrides left out of the command a results page shows: they change nothing a reader would repeat.
QUIET_OVERRIDES = ("trainer.progress",)
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


def evaluation_label(result: dict[str, Any]) -> str:
    """The evaluation column of a metalearn-eval result: split, episodes and its overrides."""
    label = f"{result['split']}, {result['episodes']} episodes"
    return f"{label}, {' '.join(result['overrides'])}" if result.get("overrides") else label


@functools.cache
def shipped_paper(experiment: str) -> dict[str, Any] | None:
    """The `paper:` figure of metalearn's own `experiment=<experiment>` config (a fact about the paper, so
    the shipped config's, corrections included, serves archived runs too); None if there is no such
    experiment or it names no figure."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from metalearn.compose import CONFIG_DIR

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
        target.cis.append(results_ci95(run.results, run.results["test"], metric))
        for result in run.evals:
            extra = row(run, evaluation_label(result), own_setting=not result.get("overrides"))
            extra.runs.append(run)
            extra.metric = result["metric"]
            extra.values.append(float(result["mean"]))
            extra.cis.append(recorded_ci95(float(result["ci95"]), int(result["episodes"]), result.get("interval")))
    return list(rows.values())


def results_ci95(results: dict[str, Any], split: dict[str, Any], name: str) -> float:
    """The 95% half-width of `name` in a results.json split, on Student's t (see `recorded_ci95`)."""
    return recorded_ci95(float(split[f"{name}_ci95"]), int(split.get("tasks", 600)), results.get("interval"))


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
