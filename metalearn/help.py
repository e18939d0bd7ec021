"""`metalearn --help` and `metalearn --version`: metalearn's own help, written from `conf/`.

Every option file of a config group begins with a comment whose first sentence says what the option is;
the help lists each group with its options and those sentences, so that it never goes stale. Hydra's own
help stays at `metalearn --hydra-help`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from metalearn import __version__
from metalearn.compose import CONFIG_DIR

# Groups of Hydra's run settings, not choices a user makes.
HIDDEN_GROUPS = ("hydra",)

USAGE = """\
metalearn {version}: a meta-learning experiment runner. A run is composed from config groups (Hydra): a
dataset (the task distribution), a model, an algorithm, an optimizer; it writes TensorBoard curves,
checkpoints, its resolved config and its results to outputs/runs/<name>/<time>/.

Usage:
  metalearn [experiment=NAME] [GROUP=OPTION ...] [KEY=VALUE ...]  one run
  metalearn -m KEY=A,B [KEY=C,D ...]                               a sweep (Hydra multirun)
  metalearn [overrides] --cfg job                                  the composed config; runs nothing
  metalearn --version | --help | --hydra-help

  metalearn experiment=protonet_omniglot_5w1s
  metalearn algorithm=protonet dataset=omniglot dataset.k_shot=5 trainer.max_steps=2000
  metalearn algorithm=reptile algorithm/inner_optimizer=sgd algorithm.inner_lr=0.02

GROUP=OPTION chooses an option (a nested group such as algorithm/inner_optimizer is written with a
slash); GROUP.KEY=VALUE sets one of its values; `--cfg job` shows every key with its value.
"""

FOOTER = """\
Evaluate a trained run: metalearn-eval --help. Tables and curves of runs: metalearn-report --help.
Curves: tensorboard --logdir outputs. Documentation: README.md and docs/ (algorithms, data,
experiments, results, performance, reliability, architecture) in the metalearn repository."""


def description(path: Path) -> str:
    """The first sentence of the comment an option file begins with ("." if it has none)."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            continue
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    # A sentence ends at a full stop before a capital, not at "et al." or "e.g.".
    return re.split(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".") + "."


def groups(root: Path) -> dict[str, list[Path]]:
    """Every config group under `root` (nested ones as `a/b`) with its option files, sorted."""
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        name = folder.relative_to(root).as_posix()
        options = sorted(folder.glob("*.yaml"))
        if options and name.split("/")[0] not in HIDDEN_GROUPS:
            found[name] = options
    return found


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def help_text(width: int | None = None) -> str:
    """metalearn's help: usage, every config group with a line per option, where to read more."""
    width = width or max(80, min(shutil.get_terminal_size((100, 20)).columns, 140))
    out = [USAGE.format(version=__version__)]
    for group, options in groups(Path(CONFIG_DIR)).items():
        out.append(f"{group}:" if group != "experiment" else "experiment (a paper's or a quick setting; the default "
                   "is maml_sinusoid):")
        name_width = max(len(p.stem) for p in options) + 2
        for path in options:
            out.append(_clip(f"  {path.stem:<{name_width}}{description(path)}", width))
        out.append("")
    out.append(FOOTER)
    return "\n".join(out)


def hydra_template() -> str:
    """The help as a Hydra help template (`hydra.help.template`): `$` escaped for string.Template."""
    return help_text().replace("$", "$$")
