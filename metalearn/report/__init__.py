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

`--page docs/results.md` rewrites the tables between the marker comments of a Markdown page from the
runs, leaving the prose around them alone (the markers are described in metalearn.report.page); with
`--check` it only says whether the page is up to date. `--archive DIR` copies the runs' small files
(config, overrides, results, evaluations, event files, pictures, logs; not checkpoints) to
DIR/<experiment>/<run>, so a page can be rebuilt from a repository.

The package: `runs` finds run directories and groups them into rows, `tables` writes the report's own
table, `page` rebuilds a results page's tables, `curves` reads event files and draws the curves; this
module joins them into the command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalearn.report.curves import plot_curves
from metalearn.report.page import update_page
from metalearn.report.runs import archive, build_rows, find_runs, varied_keys
from metalearn.report.tables import markdown, write_csv
from metalearn.reproduction import find_references


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
    """The `metalearn-report` command (see the module doc); `argv` defaults to the command line."""
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
