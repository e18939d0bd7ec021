"""Benchmark: one process per core (torchrun, Gloo) against one process using every core.

What it measures. Training speed of a real run, as a user starts it: `metalearn` on the
`maml_omniglot_5w1s_quick` experiment (second-order MAML, Conv-4 with 64 stride-2 filters, 5-way
1-shot 15-query Omniglot episodes from the data directory, meta-batch 16), for a short budget:

    one process, N threads   `OMP_NUM_THREADS=N metalearn ...`: torch's intra-op threads share each
                             convolution among the cores (the default way to use a machine).
    N processes x 1 thread   `OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=N metalearn ...`:
                             each process adapts its share of the meta-batch; one all-reduce of
                             gradients and BatchNorm statistics per meta-step (metalearn.distributed).
    one process, 1 thread    for information: what one core does alone.

Speed is meta-steps per second as the trainer logs it (`train/steps_per_sec` in the run's event
files, rank 0's clock, so the all-reduce waits are included), the median over the logged windows
after the first. Variants alternate in rounds; the figure is the median over rounds. Start-up,
dataset loading and the short final validation and test are outside the measured windows.

    python scripts/bench_distributed.py                     # 2 cores, 120 meta-steps per run, 2 rounds
    python scripts/bench_distributed.py --steps 200 --rounds 3 --nproc 2

Target: N processes x 1 thread faster than one process with N threads (ratio > 1.0). The exit status
is 0 either way: this is a measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from metalearn.report.curves import read_curve

EXPERIMENT = "maml_omniglot_5w1s_quick"
BIN = Path(sys.executable).parent
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data from the repository


def trainer_speed(experiment: str, steps: int, log_every: int, workdir: Path, data_dir: Path, *,
                  prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
                  extra: tuple[str, ...] = ()) -> tuple[float, float]:
    """Train `steps` meta-steps of `experiment` in a fresh directory under `workdir` (the command after
    `prefix`, e.g. torchrun's, with `env` added to the environment and `extra` overrides). Returns the
    median logged meta-steps/s after the first window (which includes warm-up) and the peak resident
    memory of the process started (MiB; under torchrun, the launcher's)."""
    cwd = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    settings = [f"experiment={experiment}", f"trainer.max_steps={steps}", f"trainer.log_every={log_every}",
                f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}", "trainer.val_tasks=16",
                "trainer.test_tasks=16", "trainer.progress=false", "trainer.device=cpu", f"paths.data_dir={data_dir}",
                *extra]
    command = [*prefix, str(BIN / "metalearn"), *settings]
    with open(cwd / "stderr.txt", "w+") as stderr:
        proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: the child's own resource usage, peak memory included
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        if proc.returncode != 0:
            stderr.seek(0)
            sys.exit(f"{' '.join(command)} failed:\n{stderr.read()[-3000:]}")
    (run_dir,) = (cwd / "outputs" / "runs" / experiment).iterdir()
    _, rates = read_curve(run_dir, "train/steps_per_sec")
    if len(rates) < 2:
        sys.exit(f"{run_dir}: fewer than 2 logged speed windows; raise --steps")
    return statistics.median(rates[1:]), usage.ru_maxrss / 1024


def run(variant: str, nproc: int, steps: int, log_every: int, workdir: Path, data_dir: Path) -> float:
    """One variant's meta-steps/s (see `trainer_speed`)."""
    threads = {"threads": nproc, "processes": 1, "one thread": 1}[variant]
    prefix = (str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}") if variant == "processes" else ()
    speed, _ = trainer_speed(EXPERIMENT, steps, log_every, workdir, data_dir, prefix=prefix,
                             env={"OMP_NUM_THREADS": str(threads)})
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (and threads of the one-process run)")
    parser.add_argument("--steps", type=int, default=120, help="meta-steps per run")
    parser.add_argument("--log-every", type=int, default=20, help="meta-steps per logged speed window")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("METALEARN_DATA_DIR", DATA_DIR)),
                        help="the folder holding omniglot/ (default: METALEARN_DATA_DIR or ../shared/data)")
    args = parser.parse_args()
    speeds: dict[str, list[float]] = {"threads": [], "processes": [], "one thread": []}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for round_ in range(args.rounds):
            for variant in speeds:
                speeds[variant].append(run(variant, args.nproc, args.steps, args.log_every, Path(tmp),
                                               args.data_dir.resolve()))
                print(f"round {round_ + 1}: {variant:10s} {speeds[variant][-1]:.3f} meta-steps/s", flush=True)
    median = {k: statistics.median(v) for k, v in speeds.items()}
    n = args.nproc
    print(f"\n{EXPERIMENT}, meta-batch 16, {args.steps} meta-steps per run, median of {args.rounds} rounds")
    print(f"  one process, {n} threads:        {median['threads']:.3f} meta-steps/s (reference)")
    print(f"  {n} processes x 1 thread (Gloo): {median['processes']:.3f} meta-steps/s = "
          f"{median['processes'] / median['threads']:.2f}x the reference")
    print(f"  one process, 1 thread:          {median['one thread']:.3f} meta-steps/s = "
          f"{median['one thread'] / median['threads']:.2f}x the reference")
    verdict = "PASS" if median["processes"] > median["threads"] else "FAIL"
    print(f"{verdict}: {n} processes x 1 thread {'faster' if verdict == 'PASS' else 'not faster'} than "
          f"one process with {n} threads")


if __name__ == "__main__":
    main()
