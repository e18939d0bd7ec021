"""Check that a change to the config files leaves every experiment's composed config unchanged, value for value.

Each experiment (conf/experiment/*.yaml) is composed as `metalearn experiment=<name>` composes it, the
`hydra` node dropped and every interpolation resolved, and the plain result is either recorded or compared
with a record:

    python scripts/check_configs.py record /tmp/configs_before.json    # before the change
    python scripts/check_configs.py check /tmp/configs_before.json     # after it: exit 1 on a difference
    python scripts/check_configs.py restated                           # exit 1 if an experiment repeats a value

A difference names the experiment and the first key that changed, old -> new. `hydra.runtime.choices`
(which option file a value came from) is not compared: moving values between files is the point.
`paths.data_dir` and `paths.cache_dir` follow the environment (METALEARN_DATA_DIR, METALEARN_CACHE_DIR,
HOME), so the record keeps it and `check` refuses a record made under another.

`restated` lists the values an experiment file sets to what it composes anyway: its group options, or for
an experiment that inherits another, its parent (the experiment composed from its defaults list alone),
compared as written (`${dataset.n_way}` is not 5). A `paper:` block is one value: a figure and its source
go together.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import metalearn.train  # noqa: F401  (registers the resolvers of `name` and `paths.*`)

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
ENVIRONMENT = ("METALEARN_DATA_DIR", "METALEARN_CACHE_DIR", "HOME")
ABSENT = "(absent)"
PAPER = ("paper",)  # a figure, its interval and its source are one fact


def experiments(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "experiment").glob("*.yaml"))


def _compose(experiment: str, conf_dir: Path) -> DictConfig:
    """`train.yaml` with `experiment=<experiment>`, without its `hydra` node (interpolations unresolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # `name` and ${hydra:...} resolve through it
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def composed(experiment: str, conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """The experiment's config as the run sees it: plain values, every interpolation resolved."""
    config = OmegaConf.to_container(_compose(experiment, conf_dir), resolve=True)
    assert isinstance(config, dict)
    return {str(key): value for key, value in config.items()}


def flatten(tree: Any, prefix: str = "", atoms: tuple[str, ...] = ()) -> dict[str, Any]:
    """Dotted keys to leaf values; lists, and the subtrees at the dotted keys `atoms`, are single values."""
    if isinstance(tree, dict) and tree and prefix.rstrip(".") not in atoms:
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.", atoms).items()}
    return {prefix.rstrip("."): tree}


def _show(value: Any) -> str:
    return value if value is ABSENT else json.dumps(value)


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """`key: old -> new` for the first key (in sorted order) whose value or type differs, or None."""
    flat_old, flat_new = flatten(old), flatten(new)
    for key in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(key, ABSENT), flat_new.get(key, ABSENT)
        if _show(before) != _show(after):  # JSON text: 1 and 1.0, or 0 and false, differ
            return f"{key}: {_show(before)} -> {_show(after)}"
    return None


def environment() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ENVIRONMENT}


def record(path: Path) -> None:
    found = {name: composed(name) for name in experiments()}
    path.write_text(json.dumps({"environment": environment(), "experiments": found}, indent=1) + "\n")
    print(f"wrote {path} ({len(found)} experiments)")


def check(path: Path) -> int:
    reference = json.loads(path.read_text())
    if reference["environment"] != environment():
        sys.exit(f"error: {path}: recorded under {reference['environment']}, this is {environment()}; "
                 "paths.* would differ")
    wanted: dict[str, Any] = reference["experiments"]
    names = sorted(set(wanted) | set(experiments()))
    failures = []
    for name in names:
        if name not in wanted:
            problem: str | None = "not in the record (a new experiment)"
        elif not (CONF_DIR / "experiment" / f"{name}.yaml").is_file():
            problem = f"recorded, but conf/experiment/{name}.yaml is gone"
        else:
            problem = first_difference(wanted[name], composed(name))
        if problem is not None:
            failures.append(f"{name}: {problem}")
        print(f"{'differs' if problem else 'identical'}  {name}")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    print(f"{len(names) - len(failures)} of {len(names)} experiments identical")
    return 1 if failures else 0


def _defaults_only(text: str) -> str:
    """An experiment file reduced to its package line and defaults list: what it composes without its values."""
    defaults = (yaml.safe_load(text) or {}).get("defaults", [])
    return "# @package _global_\n" + (yaml.safe_dump({"defaults": defaults}) if defaults else "")


def restated() -> int:
    """Print each value an experiment file sets to what its defaults list composes anyway; 1 if there is any."""
    total = {"standalone": [0, 0], "inheriting": [0, 0]}  # [values, restated]
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "conf"
        shutil.copytree(CONF_DIR, conf)
        for name in experiments(conf):
            file = conf / "experiment" / f"{name}.yaml"
            text = file.read_text()
            own = yaml.safe_load(text) or {}
            defaults = own.pop("defaults", [])
            kind = "inheriting" if any(isinstance(d, str) and d != "_self_" for d in defaults) else "standalone"
            file.write_text(_defaults_only(text))
            base = flatten(OmegaConf.to_container(_compose(name, conf), resolve=False), atoms=PAPER)
            file.write_text(text)
            values = flatten(own, atoms=PAPER) if own else {}
            repeated = [key for key in values if key in base and _show(base[key]) == _show(values[key])]
            for key in repeated:
                print(f"{name}: {key}: {_show(values[key])} (as composed without it)")
            total[kind][0] += len(values)
            total[kind][1] += len(repeated)
    for kind, (count, repeats) in total.items():
        print(f"{kind} experiments: {count} values, {repeats} restate what they compose")
    return 1 if any(repeats for _, repeats in total.values()) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["record", "check", "restated"])
    parser.add_argument("file", type=Path, nargs="?", help="the JSON record to write (record) or compare with (check)")
    args = parser.parse_args()
    if args.mode == "restated":
        sys.exit(restated())
    if args.file is None:
        parser.error(f"{args.mode} needs the record's path")
    if args.mode == "record":
        record(args.file)
        return
    sys.exit(check(args.file))


if __name__ == "__main__":
    main()
