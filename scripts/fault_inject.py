"""Fault injection on tiny runs: kills at random moments, two processes at once, damaged files, bad input.

    python scripts/fault_inject.py [--kills 20] [--seed 0] [--work DIR]

Runs the installed `metalearn`, `metalearn-eval` and `metalearn-data` commands in a scratch directory
and prints a table: kills sent, resumes, resumed runs bit-identical to an uninterrupted one, unreadable
checkpoints, mixed run directories, run records changed by refused commands, bad inputs tried and how
many of them gave one error line with a non-zero exit. Exits 1 if any target is missed. Needs the
Omniglot archives in $METALEARN_DATA_DIR (default ../shared/data) for the data faults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metalearn.checkpoint import CheckpointError, load_checkpoint

BIN = Path(sys.executable).parent
TINY = ["trainer.meta_batch_size=2", "trainer.val_tasks=4", "trainer.test_tasks=6", "trainer.eval_batch_size=4",
        "trainer.device=cpu", "trainer.progress=false"]
# The run that is killed: long enough for many kills, checkpointed often, validated a few times.
LONG = [*TINY, "trainer.max_steps=6000", "trainer.checkpoint_every=25", "trainer.eval_every=1000",
        "trainer.log_every=25"]
QUICK = [*TINY, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.log_every=1"]


def env() -> dict[str, str]:
    data = os.environ.get("METALEARN_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "", "METALEARN_DATA_DIR": data}


def run(cwd: Path, command: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / command), *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "metalearn"), *args], cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def same_state(a: Path, b: Path) -> bool:
    """Bitwise equality of two checkpoints' weights, optimizer state and step."""
    x, y = load_checkpoint(a), load_checkpoint(b)
    if x["step"] != y["step"] or x["algorithm"].keys() != y["algorithm"].keys():
        return False
    if not all(torch.equal(x["algorithm"][k], y["algorithm"][k]) for k in x["algorithm"]):
        return False
    return torch.equal(torch.cat([v.flatten() for s in x["optimizer"]["state"].values() for v in s.values()]),
                       torch.cat([v.flatten() for s in y["optimizer"]["state"].values() for v in s.values()]))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def one_line_error(proc: subprocess.CompletedProcess[str]) -> bool:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[")]
    return proc.returncode != 0 and len(lines) == 1 and lines[0].startswith(("error: ", "interrupted: "))


def kills(work: Path, n_kills: int, rng: random.Random, table: dict[str, object]) -> None:
    """SIGKILL a run at random moments, resuming it each time, then let it finish; compare it with a run
    that was never interrupted."""
    straight = run(work, "metalearn", *LONG, f"hydra.run.dir={work / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    target = work / "killed"
    unreadable = resumes = stale = advanced = 0
    last_step = 0
    for i in range(n_kills):
        proc = start(work, *LONG, f"hydra.run.dir={target}", *(["trainer.resume=true"] if i else []))
        time.sleep(rng.uniform(0.5, 10.0))  # from Python's start-up (about 4 s) to deep into training
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        resumes += i > 0
        stale += len(list(target.glob("checkpoints/.*.tmp")))
        for name in ("last.pt", "best.pt"):
            path = target / "checkpoints" / name
            if path.exists():
                try:
                    step = load_checkpoint(path)["step"]
                except CheckpointError:
                    unreadable += 1
                    continue
                if name == "last.pt":
                    advanced += step > last_step  # the kill came after the run had trained and checkpointed
                    last_step = step
    finished = run(work, "metalearn", *LONG, f"hydra.run.dir={target}", "trainer.resume=true")
    resumes += 1
    identical = finished.returncode == 0 and same_state(target / "checkpoints/last.pt",
                                                          work / "straight/checkpoints/last.pt")
    a, b = (json.loads((d / "results.json").read_text()) for d in (target, work / "straight"))
    identical = identical and a["test"] == b["test"] and a["best_step"] == b["best_step"]
    table.update({"kill -9 sent": n_kills, "kills after training progressed": advanced,
                  "step reached at the last kill": last_step, "resumes": resumes,
                  "resumed run bit-identical to uninterrupted": identical,
                  "unreadable checkpoints after a kill": unreadable, "stale temporary files found after kills": stale,
                  "stale temporary files left at the end": len(list(target.glob("checkpoints/.*.tmp")))})


def concurrency(work: Path, table: dict[str, object]) -> None:
    """Pairs of runs started together: without hydra.run.dir (same second), and on one hydra.run.dir."""
    mixed = 0
    for i in range(5):
        cwd = work / f"pair{i}"
        cwd.mkdir()
        procs = [start(cwd, *QUICK, f"seed={s}") for s in (1, 2)]
        for p in procs:
            p.communicate()
        runs = sorted(cwd.glob("outputs/runs/*/*"))
        seeds = sorted(load_checkpoint(r / "checkpoints/last.pt")["config"]["seed"] for r in runs
                       if (r / "checkpoints/last.pt").exists())
        events = [len(list(r.glob("events.out.tfevents.*"))) for r in runs]
        mixed += not (len(runs) == 2 and seeds == [1, 2] and events == [1, 1])
    refused = 0
    for i in range(3):
        shared = work / f"shared{i}"
        first = start(work, *LONG, f"hydra.run.dir={shared}")
        while not (shared / "config.yaml").exists() and first.poll() is None:
            time.sleep(0.05)
        second = run(work, "metalearn", *QUICK, f"hydra.run.dir={shared}", "seed=2")
        refused += one_line_error(second) and "in use by process" in second.stderr
        first.send_signal(signal.SIGTERM)
        first.communicate()
        mixed += load_checkpoint(shared / "checkpoints/last.pt")["config"]["seed"] != 0
    table.update({"run pairs started together": 8, "mixed run directories": mixed,
                  "second process on a run directory refused": f"{refused} of 3"})


def records(work: Path, table: dict[str, object]) -> None:
    """Commands refused on a finished run must not change one byte of it."""
    target = work / "finished"
    assert run(work, "metalearn", *QUICK, f"hydra.run.dir={target}").returncode == 0
    before = snapshot(target)
    attempts = [["dataset.k_shot=0", "trainer.resume=true"], ["algorithm.first_order=true", "trainer.resume=true"],
                ["model.hidden_sizes=[20,20]", "trainer.resume=true"], ["seed=3"], ["seed=1.5", "trainer.resume=true"]]
    for extra in attempts:
        run(work, "metalearn", *QUICK, f"hydra.run.dir={target}", *extra)
    table.update({"refused commands on a finished run": len(attempts),
                  "run records changed by them": int(snapshot(target) != before)})


def bad_inputs(work: Path, table: dict[str, object]) -> list[str]:
    """Each bad input must give one error line and a non-zero exit; returns those that did not."""
    finished = work / "finished"
    damaged = work / "damaged"
    damaged.mkdir()
    data = Path(env()["METALEARN_DATA_DIR"]) / "omniglot"
    (damaged / "omniglot").mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        blob = (data / name).read_bytes()
        (damaged / "omniglot" / name).write_bytes(blob[: len(blob) // 3])
    good = (finished / "checkpoints/last.pt").read_bytes()
    (damaged / "truncated.pt").write_bytes(good[: len(good) // 2])
    (damaged / "garbage.pt").write_bytes(os.urandom(len(good)))
    omniglot = ["experiment=maml_omniglot_5w1s_quick", *QUICK]
    cases = {
        "seed=1.5": ("metalearn", [*QUICK, "seed=1.5"]),
        "resume with another architecture": ("metalearn", [*QUICK, f"hydra.run.dir={finished}", "trainer.resume=true",
                                                          "model.hidden_sizes=[20,20]"]),
        "evaluate with another architecture": ("metalearn-eval", [f"ckpt_path={finished}",
                                                                  "model.hidden_sizes=[20,20]"]),
        "unwritable output directory": ("metalearn", [*QUICK, "paths.output_root=/dev/null/outputs"]),
        "unwritable hydra.run.dir": ("metalearn", [*QUICK, "hydra.run.dir=/dev/null/run"]),
        "corrupt checkpoint": ("metalearn-eval", [f"ckpt_path={damaged / 'garbage.pt'}"]),
        "truncated checkpoint": ("metalearn", [*QUICK, f"ckpt_path={damaged / 'truncated.pt'}"]),
        "truncated Omniglot archive": ("metalearn", [*omniglot, f"paths.data_dir={damaged}"]),
        "dataset.n_way=1": ("metalearn", [*omniglot, "dataset.n_way=1"]),
        "misspelt key dataset.n_wya=5": ("metalearn", [*omniglot, "dataset.n_wya=5"]),
        "metalearn-data download miniimagenet": ("metalearn-data", ["download", "miniimagenet", "--root",
                                                                    str(damaged / "mini")]),
        "resume of another method's run": ("metalearn", [*QUICK, f"ckpt_path={finished}", "algorithm=fomaml"]),
    }
    failed = []
    for label, (command, args) in cases.items():
        proc = run(work, command, *args)
        if not one_line_error(proc):
            failed.append(f"{label}: exit {proc.returncode}, stderr {proc.stderr[-300:]!r}")
    sweep = run(work, "metalearn", "-m", *QUICK, "model.hidden_sizes=[-1],[8],[-2],[-3]")
    last = sweep.stderr.strip().splitlines()[-1] if sweep.stderr.strip() else ""
    if not (sweep.returncode != 0 and "3 of 4 jobs failed" in last and all(f"job {j} (" in last for j in (0, 2, 3))):
        failed.append(f"multirun with 3 of 4 failing: {last!r}")
    table.update({"bad inputs tried": len(cases) + 1, "one-line errors": len(cases) + 1 - len(failed)})
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fault_inject_"))
    work.mkdir(parents=True, exist_ok=True)
    table: dict[str, object] = {}
    t0 = time.perf_counter()
    kills(work, args.kills, random.Random(args.seed), table)
    concurrency(work, table)
    records(work, table)
    failed = bad_inputs(work, table)
    print("| fault | result |\n|---|---|")
    for key, value in table.items():
        print(f"| {key} | {value} |")
    print(f"\n{time.perf_counter() - t0:.0f} s; scratch directory {work}")
    for line in failed:
        print(f"NOT ONE LINE: {line}")
    ok = (table["resumed run bit-identical to uninterrupted"] is True
          and table["unreadable checkpoints after a kill"] == 0 and table["mixed run directories"] == 0
          and table["run records changed by them"] == 0 and table["stale temporary files left at the end"] == 0
          and not failed)
    if args.work is None and ok:
        shutil.rmtree(work)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
