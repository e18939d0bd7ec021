"""Check that a change to metalearn's structure leaves what it computes unchanged, bit for bit.

Every experiment whose data is on this machine (Omniglot, sinusoid, the environments, the optimizees:
every algorithm option is among them) trains a few seeded steps on the CPU, on one thread, at tiny sizes.
The script hashes each tensor of the final checkpoint (the learner's weights and the optimizer's state)
and the test figures, and either records them or compares them with a record:

    python scripts/check_identical.py record scripts/identical.json     # before the change
    python scripts/check_identical.py check scripts/identical.json      # after it: exit 1 on a difference

`record --only NAME ...` updates those experiments in an existing record and keeps the others: the way to
accept an intended change of what one experiment computes.

A difference names the experiment and the first tensor or figure that changed. Floating-point kernels
differ between CPUs, so a record is only comparable on the machine (and torch build) that wrote it; the
record keeps the torch version and the CPU model, and `check` refuses a record from elsewhere.

One experiment is not compared: `oracle_navigation2d`'s weights after three steps differ from process to
process, on this code and on the code before the 2026-12-07 redesign alike (docs/reliability.md says
why); the script lists it as unstable instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from metalearn.train import train

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
DATA_DIR = (ROOT.parent / "shared" / "data").resolve()
# Datasets this machine has (the others need files that are not here, or MuJoCo).
LOCAL_DATASETS = {"sinusoid", "omniglot", "omniglot_mlp", "navigation2d", "bandit", "quadratic"}
STEPS = [
    "trainer.max_steps=3",
    "trainer.meta_batch_size=2",
    "trainer.eval_every=3",
    "trainer.log_every=1",
    "trainer.checkpoint_every=3",
    "trainer.val_tasks=2",
    "trainer.test_tasks=4",
    "trainer.eval_batch_size=2",
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.compile=false",
]
# Experiments whose weights differ between processes (docs/reliability.md): run, but not compared.
UNSTABLE = {"oracle_navigation2d"}
EXTRA = {"l2o_omniglot": ["algorithm.tuning_problems=2", "algorithm.picture_problems=2"]}


def _digest(value: Any) -> Any:
    """Nested dicts and lists with each tensor replaced by the SHA-256 of its dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.dtype.is_floating_point or t.dtype.is_complex else t
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(raw.numpy().tobytes())
        return h.hexdigest()[:16]
    if isinstance(value, dict):
        return {str(k): _digest(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_digest(v) for v in value]
    return value


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def experiments() -> list[str]:
    names = []
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={path.stem}"], return_hydra_config=True)
        if cfg.hydra.runtime.choices.dataset in LOCAL_DATASETS:
            names.append(path.stem)
    return names


def fingerprint(experiment: str, out: Path) -> dict[str, Any]:
    """Train `experiment` a few steps into `out`; the digests of its final checkpoint and test figures."""
    GlobalHydra.instance().clear()
    overrides = [*STEPS, f"experiment={experiment}", *EXTRA.get(experiment, [])]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.data_dir = str(DATA_DIR)
        del cfg.hydra
    torch.set_num_threads(1)
    results = train(cfg)
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    checkpoint = _flatten({"algorithm": _digest(state["algorithm"]), "optimizer": _digest(state["optimizer"])})
    figures = {f"test.{k}": v for k, v in results["test"].items() if isinstance(v, int | float)}
    return {**checkpoint, **figures}


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"torch": torch.__version__, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["record", "check"])
    parser.add_argument("record", type=Path, help="the JSON record to write (record) or compare with (check)")
    parser.add_argument("--only", nargs="*", default=None, help="experiments to run (default: every local one)")
    args = parser.parse_args()
    reference = json.loads(args.record.read_text()) if args.mode == "check" else None
    if reference is not None and reference["machine"] != machine():
        sys.exit(f"error: {args.record}: recorded on {reference['machine']}, this is {machine()}; "
                 "bit-identical results are only comparable on one machine")
    names = args.only or (sorted(reference["experiments"]) if reference else experiments())
    found: dict[str, Any] = {}
    failures = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            found[name] = fingerprint(name, Path(tmp) / "run")
        if reference is None:
            print(f"recorded  {name}: {len(found[name])} tensors and figures", flush=True)
            continue
        want = reference["experiments"].get(name)
        if name in UNSTABLE:
            print(f"unstable  {name} (not compared: docs/reliability.md)", flush=True)
            continue
        if want is None:
            failures.append(f"{name}: not in the record")
        elif want != found[name]:
            first = next(k for k in sorted(set(want) | set(found[name])) if want.get(k) != found[name].get(k))
            failures.append(f"{name}: {first} differs ({want.get(first)} -> {found[name].get(first)})")
        print(f"{'differs' if failures and failures[-1].startswith(name + ':') else 'identical'}  {name}", flush=True)
    if reference is None:
        kept: dict[str, Any] = {}
        if args.only and args.record.exists():
            previous = json.loads(args.record.read_text())
            if previous["machine"] != machine():
                sys.exit(f"error: {args.record}: recorded on {previous['machine']}, this is {machine()}; "
                         "record every experiment again instead of only some")
            kept = previous["experiments"]
        experiments_found = dict(sorted({**kept, **found}.items()))
        args.record.write_text(json.dumps({"machine": machine(), "experiments": experiments_found}, indent=1)
                               + "\n")
        print(f"wrote {args.record} ({len(found)} experiments recorded, {len(experiments_found)} in all)")
        return
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    compared = [name for name in names if name not in UNSTABLE]
    print(f"{len(compared) - len(failures)} of {len(compared)} experiments bit-identical "
          f"({len(names) - len(compared)} unstable, not compared)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
