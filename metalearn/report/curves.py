"""Training curves: scalar series read back from a run's TensorBoard event files, plotted per configuration."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from metalearn.report.runs import Row


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
