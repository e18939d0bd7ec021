"""Benchmark: the host memory allocator under real training runs (`trainer.allocator`).

What it measures. Training speed and peak memory of `metalearn` runs as a user starts them, for a short
budget, with the process's memory managed four ways:

    system      `trainer.allocator=system`: glibc's malloc as configured. Blocks of 32 MiB or more
                (smaller ones until its adaptive threshold has grown) are mapped with mmap and unmapped
                when freed, so every training step zero-fills fresh pages for its activations.
    retain      `trainer.allocator=retain` (what `auto` resolves to on CPU under glibc): every block comes
                from the heap and up to 1 GiB of freed memory stays there for the next step.
    tcmalloc    `LD_PRELOAD=libtcmalloc_minimal.so.4` with `trainer.allocator=system`, if installed
                (Debian: libtcmalloc-minimal4).
    jemalloc    `LD_PRELOAD=libjemalloc.so.2` with `trainer.allocator=system`, if installed
                (Debian: libjemalloc2).

Workloads: `protonet_omniglot_5w1s` (60-way 1-shot 5-query training episodes, one per step: 360 images,
activations of 36 MiB in bfloat16) and `maml_omniglot_5w1s_quick` (compiled second-order MAML, meta-batch
16 of 5-way 1-shot 15-query tasks). Speed is meta-steps per second as the trainer logs them
(`train/steps_per_sec`), the median over the logged windows after the first; peak memory is the run's
maximum resident set size. Variants alternate in rounds; medians over rounds are reported, as ratios to
`system` measured in the same run.

    python scripts/bench_allocator.py                      # both workloads, 2 rounds
    python scripts/bench_allocator.py --workloads protonet --rounds 3

Target: `retain` faster than `system` on every workload, at no more than 1.2x its peak memory. The exit
status is 0 either way: this is a measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench_distributed import DATA_DIR, trainer_speed

LIBRARIES = Path("/usr/lib/x86_64-linux-gnu")
WORKLOADS = {  # name: (experiment, meta-steps per run, meta-steps per logged window)
    "protonet": ("protonet_omniglot_5w1s", 400, 50),
    "maml": ("maml_omniglot_5w1s_quick", 120, 20),
}
VARIANTS = {  # name: (trainer.allocator, library to preload)
    "system": ("system", None),
    "retain": ("retain", None),
    "tcmalloc": ("system", LIBRARIES / "libtcmalloc_minimal.so.4"),
    "jemalloc": ("system", LIBRARIES / "libjemalloc.so.2"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("METALEARN_DATA_DIR", DATA_DIR)),
                        help="the folder holding omniglot/ (default: METALEARN_DATA_DIR or ../shared/data)")
    args = parser.parse_args()
    variants = {name: v for name, v in VARIANTS.items() if v[1] is None or v[1].exists()}
    missing = sorted(set(VARIANTS) - set(variants))
    if missing:
        print(f"not installed, skipped: {', '.join(missing)}")
    summary = []
    with tempfile.TemporaryDirectory(prefix="bench-allocator-") as tmp:
        for workload in args.workloads:
            experiment, steps, log_every = WORKLOADS[workload]
            speed: dict[str, list[float]] = {name: [] for name in variants}
            memory: dict[str, list[float]] = {name: [] for name in variants}
            for round_ in range(args.rounds):
                for name, (allocator, library) in variants.items():
                    env = {"LD_PRELOAD": str(library)} if library else {}
                    one_rate, one_peak = trainer_speed(experiment, steps, log_every, Path(tmp),
                                                       args.data_dir.resolve(), env=env,
                                                       extra=(f"trainer.allocator={allocator}",))
                    speed[name].append(one_rate)
                    memory[name].append(one_peak)
                    print(f"{workload} round {round_ + 1}: {name:9s} {one_rate:6.3f} meta-steps/s, "
                          f"{one_peak:6.0f} MiB", flush=True)
            rate = {name: statistics.median(v) for name, v in speed.items()}
            peak = {name: statistics.median(v) for name, v in memory.items()}
            print(f"\n{experiment}: {steps} meta-steps per run, median of {args.rounds} rounds")
            print(f"  {'variant':9s} {'meta-steps/s':>12s} {'ratio':>6s} {'peak MiB':>9s} {'ratio':>6s}   rounds")
            for name in variants:
                rounds = ", ".join(f"{v:.3f}" for v in speed[name])
                print(f"  {name:9s} {rate[name]:12.3f} {rate[name] / rate['system']:5.2f}x {peak[name]:9.0f} "
                      f"{peak[name] / peak['system']:5.2f}x   {rounds}")
            ok = rate["retain"] > rate["system"] and peak["retain"] <= 1.2 * peak["system"]
            summary.append(f"{workload:9s} retain {rate['retain'] / rate['system']:.2f}x the speed, "
                           f"{peak['retain'] / peak['system']:.2f}x the peak memory of system: "
                           f"{'PASS' if ok else 'FAIL'}")
            print()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
