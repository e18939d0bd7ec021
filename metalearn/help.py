"""`metalearn --help` and `metalearn --version`: metalearn's own help, written from `conf/`.

Every option file of a config group begins with a comment whose first sentence says what the option is;
the help lists each group with its options and those sentences, so that it never goes stale. Hydra's own
help stays at `metalearn --hydra-help`.
"""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

from hydra.utils import get_object

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
    return _first_sentence(" ".join(lines))


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


# -- docs/config.md ---------------------------------------------------------------------------------
def docstring_arguments(target: str) -> dict[str, str]:
    """`name -> first sentence` of the `Args:` section of `target`'s docstring (a class: its class
    docstring, then its constructor's), following a subclass's `**kwargs` to its bases."""
    try:
        cls = get_object(target)
    except (ImportError, ValueError, AttributeError):
        return {}
    found: dict[str, str] = {}
    for owner in getattr(cls, "__mro__", (cls,)):
        for doc in (owner.__doc__, getattr(owner, "__init__", None).__doc__ if isinstance(owner, type) else None):
            for names, text in _args_section(inspect.cleandoc(doc or "")):
                for name in names:
                    found.setdefault(name, _first_sentence(text))
    return found


def _args_section(doc: str) -> list[tuple[list[str], str]]:
    """The entries of a Google-style `Args:` section: (argument names, text)."""
    entries: list[tuple[list[str], str]] = []
    inside, indent = False, 0
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            inside, indent = True, len(line) - len(line.lstrip()) + 4
            continue
        if not inside:
            continue
        if line.strip() == "" or len(line) - len(line.lstrip()) < indent:
            if line.strip() and entries:
                inside = False
            continue
        entry = re.match(r"^\s*([\w*]+(?:\s*(?:,|/|and)\s*[\w*]+)*)(?:\s*\([^)]*\))?:\s*(.*)$", line)
        if len(line) - len(line.lstrip()) == indent and entry:
            names = [n.strip() for n in re.split(r",|/|\band\b", entry.group(1)) if n.strip()]
            entries.append((names, entry.group(2)))
        elif entries:
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {line.strip()}")
    return entries


def _first_sentence(text: str) -> str:
    # A sentence ends at a full stop before a capital, not at "et al." or "e.g.".
    return re.split(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z])", text.strip(), maxsplit=1)[0].rstrip(".") + "."


def option_keys(path: Path) -> list[tuple[str, str, str]]:
    """(dotted key, value as written, the comment just above it) for each setting of an option file, nested
    ones included, without `defaults`, `_target_` and `_partial_`."""
    keys: list[tuple[str, str, str]] = []
    comment: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings the line is inside
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w]*):\s*(.*?)\s*$", line)
        if not match:
            if not line.startswith(" "):
                comment = []
            continue
        indent, key, value = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if key in ("defaults", "_target_", "_partial_") and not stack:
            comment = []
            continue
        name = ".".join([k for _, k in stack] + [key])
        if value:
            if key not in ("_target_", "_partial_"):
                keys.append((name, value, " ".join(comment)))
        else:
            stack.append((indent, key))
        comment = []
    return keys


def _parent(path: Path) -> Path | None:
    """The option of the same group that an option file extends through its defaults list (`- maml`)."""
    text = path.read_text()
    block = re.search(r"^defaults:\n((?:[ \t]+.*\n)+)", text, re.M)
    for entry in re.findall(r"^\s+-\s+([\w]+)\s*$", block.group(1) if block else "", re.M):
        if entry != "_self_" and (path.parent / f"{entry}.yaml").is_file():
            return path.parent / f"{entry}.yaml"
    return None


def _targets_by_path(path: Path) -> dict[str, str]:
    """`mapping path -> _target_` of an option file ("" for the file's own, or the one of the option it
    extends)."""
    from omegaconf import OmegaConf

    found: dict[str, str] = {}
    parent = _parent(path)
    if parent is not None:
        found.update(_targets_by_path(parent))

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found[prefix] = node["_target_"]
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))

    walk(OmegaConf.to_container(OmegaConf.load(path), resolve=False), "")
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_reference() -> str:
    """docs/config.md: every option of every config group with each of its settings, the value it sets
    and what it means (the comment above it in the file, else the constructor's docstring)."""
    root = Path(CONFIG_DIR)
    out = ["# Configuration reference", "",
           "Every option of every config group (`conf/`), each setting with the value the option file sets and",
           "what it means: the comment above it in the file, else the `Args:` entry of its class's docstring.",
           "Written by `python -m metalearn.help config > docs/config.md`; `tests/test_help.py` fails when it is",
           "out of date. Choose an option with `GROUP=OPTION`, set a value with `GROUP.KEY=VALUE`; the",
           "experiments (`experiment=NAME`) are listed in [experiments.md](experiments.md) and by `metalearn --help`.",
           "", "## Top level (conf/train.yaml)", "", "| key | value | meaning |", "| --- | --- | --- |"]
    for key, value, comment in option_keys(root / "train.yaml"):
        out.append(f"| `{key}` | `{_cell(value)}` | {_cell(comment) or '—'} |")
    for group, options in groups(root).items():
        if group == "experiment":
            continue
        out += ["", f"## {group}", ""]
        for path in options:
            targets = _targets_by_path(path)
            out += [f"### `{group}={path.stem}`", "", description(path)]
            if "" in targets:
                out += ["", f"Builds `{targets['']}`."]
            rows = []
            for key, value, comment in option_keys(path):
                parent, _, last = key.rpartition(".")
                meaning = comment or docstring_arguments(targets.get(parent, "")).get(last, "") if (
                    comment or parent in targets) else comment
                rows.append(f"| `{key}` | `{_cell(value)}` | {_cell(meaning) or '—'} |")
            if rows:
                out += ["", "| key | value | meaning |", "| --- | --- | --- |", *rows]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["config"]:
        sys.exit("usage: python -m metalearn.help config > docs/config.md")
    print(config_reference(), end="")
