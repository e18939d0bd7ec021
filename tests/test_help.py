"""`metalearn --help` is metalearn's own help, written from conf/; `metalearn --version` is metalearn's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from metalearn import __version__
from metalearn.help import config_reference, description, groups, help_text
from tests.conftest import CONF_DIR

METALEARN = str(Path(sys.executable).with_name("metalearn"))


def test_version_is_metalearns() -> None:
    done = subprocess.run([METALEARN, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == f"metalearn {__version__}\n"


def test_help_lists_every_group_and_option_with_its_description() -> None:
    done = subprocess.run([METALEARN, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shown = done.stdout
    assert shown.startswith(f"metalearn {__version__}: a meta-learning experiment runner")
    assert "Hydra" not in shown.splitlines()[-1] and "metalearn-eval --help" in shown
    found = groups(CONF_DIR)
    assert {"algorithm", "algorithm/inner_optimizer", "dataset", "experiment", "model"} <= set(found)
    assert not any(group.startswith("hydra") for group in found)
    for group, options in found.items():
        assert f"\n{group}:" in shown or group == "experiment"
        for path in options:
            assert f"\n  {path.stem} " in shown, path


def test_every_option_file_says_what_it_is() -> None:
    """The help's line of an option is its file's first comment sentence: every option needs one."""
    missing = [str(p.relative_to(CONF_DIR)) for options in groups(CONF_DIR).values() for p in options
               if description(p) == "."]
    assert missing == []


def test_description_is_the_first_sentence(tmp_path: Path) -> None:
    option = tmp_path / "x.yaml"
    option.write_text("# @package _global_\n# Reptile (Nichol et al., 2018): move the initialisation, e.g. by\n"
                      "# SGD. More detail here.\n_target_: a.B\n# not this\n")
    assert description(option) == "Reptile (Nichol et al., 2018): move the initialisation, e.g. by SGD."
    option.write_text("_target_: a.B\n")
    assert description(option) == "."
    assert "  reptile " in help_text(width=100) and all(len(line) <= 100 for line in help_text(width=100).splitlines())


def test_config_reference_is_up_to_date_and_explains_every_key() -> None:
    """docs/config.md is what `python -m metalearn.help config` writes from conf/ and the docstrings, and
    every setting in it has a meaning."""
    written = (CONF_DIR.parent / "docs" / "config.md").read_text()
    assert written == config_reference(), "regenerate: python -m metalearn.help config > docs/config.md"
    for key in ("`checkpoint_every`", "`eval_batch_size`", "`flush_secs`", "`inner_lr`", "`betas`", "`max_kl`"):
        assert key in written
    undocumented = [line for line in written.splitlines() if line.endswith("| — |")]
    assert undocumented == []
