"""The one-line messages of the errors the `metalearn` command reports (plain text work, no heavy imports)."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path


def one_line(ex: BaseException, expected: tuple[type[BaseException], ...]) -> str:
    """Condense Hydra/OmegaConf's multi-line errors to one line, keeping what names the key or option; an
    `expected` error raised inside a resolver (e.g. the run directory's) is shown as it is."""
    cause: BaseException | None = ex
    while cause is not None:  # OmegaConf re-raises a resolver's error as the context of its own
        if isinstance(cause, expected):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    parts: list[str] = []
    for e in (ex, ex.__cause__):
        if e is None:
            continue
        text = str(e).split("Config search path")[0]
        parts += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(
            ("full_key:", "object_type=", "reference_type="))]
    return " ".join(dict.fromkeys(parts))


def did_you_mean(ex: BaseException) -> str | None:
    """For `group.misspelt=value` (a key its group does not have), the one line that names the closest
    keys of the group, instead of Hydra's hint to add the key with `+`, which only leads to a second error."""
    match = re.search(r"Could not override '([^']+)'", str(ex))
    parent = getattr(ex.__cause__, "parent_node", None)
    if match is None or not callable(getattr(parent, "keys", None)):
        return None
    key = match.group(1)
    group, _, name = key.rpartition(".")
    options = [str(k) for k in parent.keys()]  # type: ignore[union-attr]
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    prefix = f"{group}." if group else ""
    if close:
        hint = "did you mean " + " or ".join(f"{prefix}{c}" for c in close) + "?"
    else:
        hint = f"the settings there are {', '.join(prefix + o for o in options)}"
    return f"{key}: no such setting; {hint} (+{key}=... would add it as a new key)"


def failed_jobs(first: str) -> str:
    """All failed jobs of the sweep whose first failure reads `first` (`job <n> (<dir>) failed: ...`),
    counted and named from the `failed.json` files of its job directories."""
    match = re.match(r"job \d+ \((.*)\) failed:", first)
    sweep = Path(match.group(1)).parent if match else None
    if sweep is None or not sweep.is_dir():
        return first
    jobs = sorted((d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    failures = []
    for job in jobs:
        if (job / "failed.json").is_file():
            record = json.loads((job / "failed.json").read_text())
            failures.append(f"job {job.name} ({job}): {record['error']}: {record['message']}")
    if not failures:
        return first
    return f"{len(failures)} of {len(jobs)} jobs failed: " + "; ".join(failures)
