"""The README's quick-start commands stay true: CI runs the test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_ci_runs_the_readme_test_command() -> None:
    install_and_run, install_and_test = quick_start_commands()
    assert install_and_run.endswith("&& metalearn")
    assert install_and_test.endswith("&& pytest")
    assert install_and_test in ROOT.joinpath(".ci/run").read_text().splitlines()


def test_constraints_pin_the_cpu_build_and_pyproject_keeps_a_range() -> None:
    assert "torch==2.13.0" in ROOT.joinpath("constraints-cpu.txt").read_text()
    assert '"torch>=2.4"' in ROOT.joinpath("pyproject.toml").read_text()
