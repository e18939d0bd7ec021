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
from metalearn.report import read_curve, report
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
