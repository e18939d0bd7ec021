"""`metalearn-report` over a small real multirun with a failed job and a metalearn-eval evaluation."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from metalearn.evaluate import evaluate, parse_args
from metalearn.report import report
from metalearn.report.curves import read_curve
from tests.test_cli import cli_env, only_run_dir, run_cli

METALEARN_REPORT = str(Path(sys.executable).with_name("metalearn-report"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two settings × two seeds; every job of hidden_sizes=[-3] fails. One run is also evaluated 20-shot."""
    cwd = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        from tests.conftest import DATA_DIR

        mp.setenv("METALEARN_DATA_DIR", str(DATA_DIR))
        proc = run_cli(cwd, "model.hidden_sizes=[8],[-3]", "seed=0,1",
                       'paper={value:0.77,ci95:0.11,source:"Li et al., 2017"}', multirun=True)
    assert proc.returncode == 1, proc.stderr  # the sweep ran, with failed jobs
    root = only_run_dir(cwd / "outputs" / "multiruns" / "maml_sinusoid")
    ok = sorted(p for p in root.iterdir() if (p / "results.json").is_file())
    assert len(ok) == 2
    evaluate(parse_args([f"ckpt_path={ok[0]}", "eval.episodes=4", "dataset.k_shot=20"]))
    return root


def test_rows_pool_seeds_and_mark_failed_jobs(sweep: Path, tmp_path: Path) -> None:
    result = report([sweep], tmp_path)
    assert result["keys"] == ["model.hidden_sizes"]  # seed varies too, but is pooled, not a column
    rows = {(r.settings, r.evaluation): r for r in result["rows"]}
    assert set(rows) == {(("[8]",), "test (end of training)"), (("[-3]",), "test (end of training)"),
                         (("[8]",), "test, 4 episodes, dataset.k_shot=20")}

    good = rows[("[8]",), "test (end of training)"]
    tests = [json.loads((run.path / "results.json").read_text())["test"] for run in good.runs]
    assert sorted(r.seed for r in good.runs) == [0, 1]
    assert good.values == [t["query_mse"] for t in tests]
    failed = rows[("[-3]",), "test (end of training)"]
    assert failed.values == [] and failed.failed == ["ConfigError: model.hidden_sizes[0]=-3: must be a positive "
                                                     "integer"] * 2

    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[0] == ("| experiment | model.hidden_sizes | evaluation | seeds | result | per-run 95% CI | paper | "
                        "status |")
    mean, std = statistics.fmean(good.values), statistics.stdev(good.values)
    good_line = next(line for line in lines if "| [8] | test (end" in line)
    assert f"| {mean:.4f} ± {std:.4f} (std, 2 seeds) |" in good_line
    assert f"{tests[0]['query_mse']:.4f} ± {tests[0]['query_mse_ci95']:.4f}" in good_line
    assert "| 0.7700 ± 0.1100 (Li et al., 2017) | 2 ok |" in good_line
    bad_line = next(line for line in lines if "| [-3] |" in line)
    assert "2 failed (ConfigError: model.hidden_sizes[0]=-3: must be a positive integer)" in bad_line

    with (tmp_path / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    by_setting = {(r["model.hidden_sizes"], r["evaluation"]): r for r in table}
    row = by_setting["[8]", "test (end of training)"]
    assert math.isclose(float(row["mean"]), mean) and math.isclose(float(row["std"]), std)
    assert by_setting["[-3]", "test (end of training)"]["failed"] == "2"
    evaluated = by_setting["[8]", "test, 4 episodes, dataset.k_shot=20"]
    written = json.loads(next(sweep.glob("*/eval_test_*.json")).read_text())
    assert float(evaluated["mean"]) == pytest.approx(written["mean"]) and evaluated["seeds"] == "1"


def test_curves_come_from_the_event_files(sweep: Path, tmp_path: Path) -> None:
    result = report([sweep], tmp_path)
    names = sorted(p.name for p in result["pictures"])
    assert names == ["curves_train_meta_loss.png", "curves_val_query_mse.png"]
    for path in result["pictures"]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300
    run = next(p for p in sweep.iterdir() if (p / "results.json").is_file())
    steps, values = read_curve(run, "val/query_mse")
    assert steps == [2, 4]  # validated every 2 of 4 steps
    assert min(values) == pytest.approx(json.loads((run / "results.json").read_text())["val"]["query_mse"])


def test_command_line(sweep: Path, tmp_path: Path) -> None:
    proc = subprocess.run([METALEARN_REPORT, str(sweep), "--out", str(tmp_path / "r"), "--no-curves"],
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| experiment | model.hidden_sizes |" in proc.stdout
    assert f"4 runs (2 failed) -> {tmp_path / 'r' / 'report.md'}" in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([METALEARN_REPORT, str(empty)], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 2 and proc.stderr == f"error: {empty}: no runs found (no config.yaml below)\n"


PAGE = """# Results

Prose stays as it is.

<!-- metalearn-report: maml_sin* -->
stale table
<!-- /metalearn-report -->

<!-- metalearn-report validation: maml_sinusoid -->
<!-- /metalearn-report -->
"""

TIME_LOG = """\tCommand being timed: "metalearn model.hidden_sizes=[8] seed=0"
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.50
\tMaximum resident set size (kbytes): 524288
"""


def test_results_page_from_an_archive(sweep: Path, tmp_path: Path) -> None:
    archived = tmp_path / "runs"
    proc = subprocess.run([METALEARN_REPORT, str(sweep), "--archive", str(archived)], capture_output=True, text=True,
                          env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    copies = sorted((archived / "maml_sinusoid").iterdir())
    assert len(copies) == 4 and proc.stdout.endswith(f"4 runs archived to {archived}\n")
    ok = [c for c in copies if (c / "results.json").is_file()]
    assert len(ok) == 2 and not list(archived.rglob("*.pt"))  # no checkpoints
    for copy in ok:
        assert (copy / ".hydra" / "overrides.yaml").is_file() and list(copy.glob("events.out.tfevents.*"))
    # The archive reports exactly what the runs report.
    assert report([archived], tmp_path / "a", curves=False)["markdown"] == report([sweep], tmp_path / "b",
                                                                                 curves=False)["markdown"]
    seed0 = next(c for c in ok if "seed: 0" in (c / "config.yaml").read_text())
    (seed0 / "time.log").write_text(TIME_LOG)

    page = tmp_path / "results.md"
    page.write_text(PAGE)
    check = [METALEARN_REPORT, str(archived), "--page", str(page), "--check"]
    stale = subprocess.run(check, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert stale.returncode == 1 and f"error: {page} is out of date" in stale.stderr
    proc = subprocess.run([METALEARN_REPORT, str(archived), "--page", str(page), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert subprocess.run(check, capture_output=True, text=True, env=cli_env(), timeout=300).returncode == 0

    text = page.read_text()
    assert text.startswith("# Results\n\nProse stays as it is.\n\n<!-- metalearn-report: maml_sin* -->\n| run |")
    assert "stale table" not in text
    lines = text.splitlines()
    good = next(line for line in lines if line.startswith("| maml_sinusoid model.hidden_sizes=[8] (seeds"))
    results = [json.loads((c / "results.json").read_text()) for c in ok]
    values = [r["test"]["query_mse"] for r in results]
    pre = statistics.fmean(r["test"]["query_mse_pre"] for r in results)
    cells = [c.strip() for c in good.split("|")[1:-1]]
    given = [o.removeprefix("- ") for o in (seed0 / ".hydra" / "overrides.yaml").read_text().splitlines()]
    assert "model.hidden_sizes=[8]" in given and "seed=0" in given
    # Seeds pooled: the command without its seed; trainer.progress says nothing about the result.
    shown = [o for o in given if not o.startswith(("seed=", "trainer.progress="))]
    assert cells[1] == "`" + " ".join(["metalearn", *shown]) + "`"
    assert cells[2] == "4"  # meta-steps
    assert cells[3] == f"**{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} (std, 2 seeds)**"
    assert cells[4] == f"{pre:.4f}"
    assert cells[6] == "1 h 2 min, 512 MiB"  # from time.log: 1:02:03.5 and 524,288 kB
    assert cells[7] == "0.7700 ± 0.1100 (Li et al., 2017)"
    evaluated = next(line for line in lines if "; test, 4 episodes, dataset.k_shot=20 |" in line.split("`")[0] + " |"
                     or "dataset.k_shot=20`" in line)
    assert "`metalearn-eval ckpt_path=<run> eval.episodes=4 dataset.k_shot=20`" in evaluated
    failed = next(line for line in lines if line.startswith("| maml_sinusoid model.hidden_sizes=[-3]"))
    assert "2 failed (ConfigError: model.hidden_sizes[0]=-3" in failed

    validation = [line for line in lines[lines.index("<!-- metalearn-report validation: maml_sinusoid -->"):]
                  if line.startswith("| maml_sinusoid")]
    assert len(validation) == 2  # one line per finished run
    steps, curve = read_curve(seed0, "val/query_mse")
    assert f"query_mse, {curve[0]:.3f} (2), {curve[1]:.3f} (4)" in next(v for v in validation if "(seed 0)" in v)

    page.write_text("<!-- metalearn-report: protonet_* -->\n<!-- /metalearn-report -->\n")
    proc = subprocess.run(check, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {page}: the block '<!-- metalearn-report: protonet_* -->' matches no run\n"


def test_results_page_is_up_to_date() -> None:
    """docs/results.md is what metalearn-report makes of the runs archived in docs/results/runs."""
    from metalearn.report.page import update_page
    from metalearn.report.runs import build_rows, find_runs, varied_keys
    from metalearn.reproduction import find_references

    docs = Path(__file__).resolve().parents[1] / "docs"
    runs = find_runs([docs / "results" / "runs"])
    keys = varied_keys(runs)
    text = (docs / "results.md").read_text()
    assert text.count("<!-- metalearn-report") >= 5
    references = find_references([docs / "results" / "runs"])
    assert update_page(text, build_rows(runs, keys), keys, references=references, base=docs) == text, (
        "docs/results.md is out of date: metalearn-report docs/results/runs --out docs/results --page docs/results.md")


def test_metrics_block_picks_the_first_metric_a_run_has(sweep: Path, tmp_path: Path) -> None:
    from metalearn.report.page import update_page
    from metalearn.report.runs import build_rows, find_runs, varied_keys

    runs = find_runs([sweep])
    keys = varied_keys(runs)
    page = ("<!-- metalearn-report metrics after=query_mse before=nope|query_mse_pre gone=nope: maml_sinusoid -->\n"
            "<!-- /metalearn-report -->\n")
    text = update_page(page, build_rows(runs, keys), keys)
    lines = text.splitlines()
    assert lines[1] == "| run | command | after | before | gone | paper figure | status |"
    good = next(line for line in lines if "hidden_sizes=[8]" in line.split("|")[1])
    results = [r.results for r in runs if r.results is not None]
    after = [r["test"]["query_mse"] for r in results]
    before = [r["test"]["query_mse_pre"] for r in results]
    cells = [c.strip() for c in good.split("|")[1:-1]]
    assert cells[2] == f"{statistics.fmean(after):.4f} ± {statistics.stdev(after):.4f} (std)"
    assert cells[3] == f"{statistics.fmean(before):.4f} ± {statistics.stdev(before):.4f} (std)"
    assert cells[4] == "—" and cells[5] == "0.7700 ± 0.1100 (Li et al., 2017)"
    assert cells[6] == f"open: {statistics.fmean(after) - 0.77:.4f} under the paper, no equal-budget reference yet"
    assert not any("hidden_sizes=[-3]" in line for line in lines)  # failed runs have no metrics
    with pytest.raises(ValueError, match="neither a results table"):
        update_page(page.replace("metrics", "curves"), build_rows(runs, keys), keys)
