"""The `metalearn` console entry, free of heavy imports so that a signal is handled from the first moment.

While the libraries are imported, SIGTERM or Ctrl-C ends the process at once with one line (nothing
has been done yet, and an exception raised inside a library's import can leave it half-initialised
and fail later with an unrelated error). From then on SIGTERM interrupts like Ctrl-C (a
KeyboardInterrupt naming the signal) everywhere outside the training loop, which handles both itself
and stops at a step boundary. A run stopped while it is set up or tested therefore exits 130 with one
line, as one stopped while training does.
"""

from __future__ import annotations

import os
import signal
import sys


def _exit_at_once(signum: int, frame: object) -> None:
    sys.stderr.write(f"interrupted: stopped by signal {signum} during set-up\n")
    sys.stderr.flush()
    os._exit(130)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main() -> None:
    """Run the `metalearn` command (`metalearn.train.main`) with the signal handling described above."""
    previous_int = signal.signal(signal.SIGINT, _exit_at_once)
    signal.signal(signal.SIGTERM, _exit_at_once)
    from metalearn.train import main as run

    signal.signal(signal.SIGINT, previous_int)
    signal.signal(signal.SIGTERM, _interrupt)
    run()
