"""Time to accuracy: validation accuracy against wall time, metalearn against learn2learn's MAML.

Two subcommands.

`peer` trains second-order MAML with learn2learn 0.2.0 (an optional benchmark dependency; see
scripts/bench_peers.py for how to install it) the way its README and Omniglot example do it: per task
`clone()`, `adapt()` on the support loss, the query loss, `backward()`, one Adam step per meta-batch; float32,
eager. Everything else is metalearn's, so that only the training loop differs: the experiment's config
(`--experiment`, default maml_omniglot_5w1s_quick: Conv-4 with 64 stride-2 filters and batch-statistics
BatchNorm, 5-way 1-shot 15-query, meta-batch 16, inner lr 0.4, Adam 1e-3 and the experiment's
learning-rate schedule), the same initial weights (the
run's seed), the same training episodes (the trainer's generator), the same fixed validation tasks, and
the same evaluation protocol (3 inner steps at test, accuracy on the query set). Wall time counts from
the first training step and includes the validations, as metalearn's trainer counts it. It stops at the
experiment's `trainer.max_steps` or after `--minutes`, whichever comes first, and writes `curve.json`:

    python scripts/time_to_accuracy.py peer --out docs/results/peers/l2l_maml_omniglot_5w1s_quick

`report` reads a metalearn run directory (its validation scalars and their TensorBoard wall times,
counted from the event file's creation just before the first step) and one or more peer curves, and
prints a markdown table (validation accuracy reached by given times; time to reach given accuracies)
and writes a figure:

    python scripts/time_to_accuracy.py report --run docs/results/runs/maml_omniglot_5w1s_quick/<stamp> \\
        --peer docs/results/peers/l2l_maml_omniglot_5w1s_quick --figure docs/results/time_to_accuracy.png

Start each training alone on an idle machine: the two libraries must not share the cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_peers import INSTALL, import_learn2learn
from hydra.utils import instantiate
from torch import Tensor

from metalearn.compose import CONFIG_DIR, build_learner
from metalearn.metrics import mean_ci95
from metalearn.objectives import Classification
from metalearn.tasks import TaskBatch, fixed_batches

VAL_TAG = "val/query_acc"


def compose_experiment(experiment: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={experiment}", *overrides])


def peer_accuracy(maml: Any, batch: TaskBatch, steps: int, objective: Classification) -> Tensor:
    """Query accuracy [T] of learn2learn's MAML adapted with `steps` inner steps to each task."""
    scores = []
    for t in range(batch.support_x.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(objective.loss(learner(batch.support_x[t]), batch.support_y[t]))
        with torch.no_grad():
            scores.append(objective.score(learner(batch.query_x[t]), batch.query_y[t]))
    return torch.stack(scores)


def train_peer(args: argparse.Namespace) -> None:
    l2l = import_learn2learn()
    if l2l is None:
        print(INSTALL, file=sys.stderr)
        raise SystemExit(2)
    cfg = compose_experiment(args.experiment, args.overrides)
    tasks, algorithm = build_learner(cfg)  # the run's model, initialised from its seed, and its tasks
    model, objective = algorithm.model, Classification()
    maml = l2l.MAML(model, lr=float(cfg.algorithm.inner_lr), first_order=bool(cfg.algorithm.first_order))
    optimizer = torch.optim.Adam(maml.parameters(), lr=float(cfg.optimizer.lr))
    # The experiment's learning-rate schedule, if it has one, stepped once per meta-step as the trainer does.
    scheduler = instantiate(cfg.scheduler)(optimizer) if cfg.get("scheduler") else None
    trainer = cfg.trainer
    generator = torch.Generator().manual_seed(int(cfg.seed))  # the trainer's training-episode stream
    val = list(fixed_batches(tasks, "val", int(trainer.val_tasks), int(trainer.val_seed),
                             int(trainer.eval_batch_size)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curve: list[dict[str, float]] = []
    limit = args.minutes * 60
    start = time.perf_counter()
    for step in range(1, int(trainer.max_steps) + 1):
        batch = tasks.sample(int(trainer.meta_batch_size), "train", generator)
        optimizer.zero_grad()
        n = batch.support_x.shape[0]
        for t in range(n):
            learner = maml.clone()
            learner.adapt(objective.loss(learner(batch.support_x[t]), batch.support_y[t]))
            (objective.loss(learner(batch.query_x[t]), batch.query_y[t]) / n).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        last = step == int(trainer.max_steps) or time.perf_counter() - start >= limit
        if step % int(trainer.eval_every) == 0 or last:
            steps = int(cfg.algorithm.eval_inner_steps or cfg.algorithm.inner_steps)
            acc = torch.cat([peer_accuracy(maml, b, steps, objective) for b in val])
            mean, half = mean_ci95(acc)
            point = {"step": step, "seconds": round(time.perf_counter() - start, 1), "val_acc": mean, "val_ci95": half}
            curve.append(point)
            print(json.dumps(point), flush=True)
            (out / "curve.json").write_text(json.dumps({
                "library": f"learn2learn {_version('learn2learn')}", "torch": torch.__version__,
                "threads": torch.get_num_threads(), "experiment": args.experiment, "overrides": args.overrides,
                "curve": curve}, indent=1) + "\n")
        if last:
            break


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


# -- report ---------------------------------------------------------------------------------------------
def metalearn_curve(run: Path) -> list[dict[str, float]]:
    """(step, seconds since the event file was created, validation accuracy) of a metalearn run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run.glob("events.out.tfevents.*"))
    if len(files) != 1:
        raise SystemExit(f"--run {run}: expected one event file (a run never resumed), found {len(files)}")
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    events.Reload()
    origin = events.FirstEventTimestamp()
    return [{"step": e.step, "seconds": round(e.wall_time - origin, 1), "val_acc": e.value}
            for e in events.Scalars(VAL_TAG)]


def reached(curve: list[dict[str, float]], minutes: float) -> str:
    """Best validation accuracy reached within `minutes`, or a dash."""
    values = [p["val_acc"] for p in curve if p["seconds"] <= minutes * 60]
    return f"{100 * max(values):.1f}%" if values else "—"


def time_to(curve: list[dict[str, float]], accuracy: float) -> str:
    """Wall time at which validation first reached `accuracy`, or a dash."""
    for point in curve:
        if point["val_acc"] >= accuracy:
            return f"{point['seconds'] / 60:.1f} min (step {int(point['step']):,})"
    return "not reached"


def report(args: argparse.Namespace) -> None:
    curves = {"metalearn": metalearn_curve(Path(args.run))}
    for peer in args.peer:
        data = json.loads((Path(peer) / "curve.json").read_text())
        curves[data["library"]] = data["curve"]
    # Columns every 10 minutes up to the longest curve's end, rounded to the nearest 10 minutes.
    minutes = list(range(10, 10 * max(1, round(max(c[-1]["seconds"] for c in curves.values()) / 600)) + 1, 10))
    print("| library | " + " | ".join(f"best by {m} min" for m in minutes) + " | "
          + " | ".join(f"time to {a:.0%}" for a in args.accuracies) + " | last step, minutes |")
    print("| --- " * (2 + len(minutes) + len(args.accuracies)) + "|")
    for name, curve in curves.items():
        cells = [reached(curve, m) for m in minutes] + [time_to(curve, a) for a in args.accuracies]
        end = f"{int(curve[-1]['step']):,}, {curve[-1]['seconds'] / 60:.1f}"
        print(f"| {name} | " + " | ".join(cells) + f" | {end} |")
    if args.figure:
        lines = {name: ([p["seconds"] / 60 for p in curve], [100 * p["val_acc"] for p in curve])
                 for name, curve in curves.items()}
        bottom = max(0.0, min(100 * p["val_acc"] for c in curves.values() for p in c) - 2)
        line_figure(lines, "wall time (minutes, validations included)", f"{VAL_TAG} (%)", args.figure, bottom)


def line_figure(lines: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, path: str,
                bottom: float | None = None) -> None:
    """One labelled line per entry (x values, y values), written to the PNG `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker=".", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if bottom is not None:
        ax.set_ylim(bottom=bottom)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"figure: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    peer = sub.add_parser("peer", help="train learn2learn's MAML on the experiment's tasks")
    peer.add_argument("--experiment", default="maml_omniglot_5w1s_quick")
    peer.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget")
    peer.add_argument("--out", required=True, help="directory for curve.json")
    peer.add_argument("overrides", nargs="*", help="config overrides, as on metalearn's command line")
    rep = sub.add_parser("report", help="table and figure from a metalearn run and peer curves")
    rep.add_argument("--run", required=True, help="a metalearn run directory")
    rep.add_argument("--peer", nargs="*", default=[], help="directories holding curve.json")
    rep.add_argument("--accuracies", type=float, nargs="*", default=[0.95, 0.96, 0.97])
    rep.add_argument("--figure", default=None, help="where to write the PNG")
    args = parser.parse_args()
    (train_peer if args.command == "peer" else report)(args)


if __name__ == "__main__":
    main()
