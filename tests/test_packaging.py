"""The built wheel carries the configs and runs without the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_configs_and_runs_from_anywhere(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("metalearn-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    conf = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert {f"metalearn/conf/{name}" for name in conf} <= names
    assert {"metalearn/rl/envs.py", "metalearn/rl/mujoco.py", "metalearn/algorithms/maml_rl.py"} <= names

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "metalearn.train", *TINY], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list(work.glob("outputs/runs/maml_sinusoid/*/results.json"))
    probe = subprocess.run([sys.executable, "-c", "import metalearn.train as t; print(t.CONFIG_DIR)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == str(site / "metalearn" / "conf")
