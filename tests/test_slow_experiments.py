"""Full-size experiments: the documented results hold. Run with `pytest -m slow`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

METALEARN = str(Path(sys.executable).with_name("metalearn"))


@pytest.mark.slow
def test_default_run_reaches_the_promised_mse(tmp_path: Path) -> None:
    """`metalearn` with no arguments: post-adaptation test MSE (600 tasks) at most 0.80."""
    proc = subprocess.run([METALEARN, "trainer.progress=false"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr
    (results,) = tmp_path.glob("outputs/runs/maml_sinusoid/*/results.json")
    test = json.loads(results.read_text())["test"]
    assert test["tasks"] == 600
    assert test["query_mse"] <= 0.80
    assert test["query_mse"] < 0.3 * test["query_mse_pre"]
