"""Run directories as records that belong to one run: created exclusively, locked while in use.

A new run gets a directory nobody else can get (`mkdir` without `exist_ok`, so two runs started in
the same second take `<stamp>` and `<stamp>_1`). While a run lives it holds an advisory lock
(`fcntl.flock`) on `<run dir>/.lock`; a second process on the same directory stops at once. The
kernel drops the lock when its holder exits in any way, kill -9 included, so a stale lock never
blocks a resume. The lock file is never deleted: deleting it would let two processes lock two
different files of the same name.
"""

from __future__ import annotations

import fcntl
import logging
import os
from logging.handlers import MemoryHandler
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# What makes a directory hold a run: a recorded config or a checkpoint directory.
RECORD = ("config.yaml", "checkpoints")


class RunDirError(RuntimeError):
    """A run directory cannot be used: it is in use, or it already holds another run."""


def create_fresh(root: Path, stamp: str) -> Path:
    """Create and return `root/stamp`, or `root/stamp_1`, `_2`, ... if taken (atomically: `mkdir` fails
    if another process created the directory first, and the next name is tried).

    Args:
        root: the parent folder (created if missing).
        stamp: the directory's name, usually a timestamp.

    Returns:
        The new, empty directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = root / (stamp if n == 0 else f"{stamp}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RunDirError(f"{root}: no free run directory name for {stamp}")


def write_new(path: Path, text: str) -> Path:
    """Write `text` to `path`, or to `path` with `_1`, `_2`, ... before its suffix if that exists, creating
    the file exclusively (two evaluations of one run in the same second never overwrite each other).

    Returns:
        The file written.
    """
    for n in range(10_000):
        candidate = path if n == 0 else path.with_name(f"{path.stem}_{n}{path.suffix}")
        try:
            with candidate.open("x") as f:
                f.write(text)
        except FileExistsError:
            continue
        return candidate
    raise RunDirError(f"{path}: no free file name")


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` already holds a run's record (its config or checkpoints)."""
    return any((run_dir / name).exists() for name in RECORD)


class RunLock:
    """An exclusive lock on a run directory for the lifetime of this object (or of the process).

    Args:
        run_dir: the run directory (must exist).

    Raises:
        RunDirError: another process holds the lock; the message names the directory and that process.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{run_dir}: the run directory is in use by process {holder}; wait for it to "
                              "finish or stop it, or start a new run elsewhere") from None
        self._fd: int | None = fd

    def announce(self) -> None:
        """Write this process's id into the lock file, for the message another process gets (done once
        the directory is accepted, so that a refused command leaves the file as it was)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Give the lock up (also done by the kernel when the process ends)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def remove_stale_temporaries(ckpt_dir: Path) -> list[Path]:
    """Delete temporary files that a killed writer left in `ckpt_dir` (`.<name>.*.tmp`); call it only
    while holding the run's lock, when no writer can be active.

    Returns:
        The files removed.
    """
    stale = sorted(ckpt_dir.glob(".*.tmp")) if ckpt_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def next_resume_dir(run_dir: Path) -> Path:
    """`<run dir>/.hydra/resume-<n>`, the first that does not exist: where a resume's own config and
    overrides go, beside (never over) the original ones in `.hydra/`."""
    n = 1
    while (run_dir / ".hydra" / f"resume-{n}").exists():
        n += 1
    return run_dir / ".hydra" / f"resume-{n}"


class HeldLog:
    """Holds back the run log's records (Hydra's `train.log` handler) in memory until the run is accepted
    into its directory, so that a command refused on an existing run (in use, other settings, bad input)
    writes nothing into it.

    Args:
        output_dir: the run directory; file handlers of the root logger that write into it are held.
    """

    def __init__(self, output_dir: Path) -> None:
        self.fresh = False  # set by `train` once it knows the directory held no run before
        self._root = logging.getLogger()
        self._files = [h for h in self._root.handlers if isinstance(h, logging.FileHandler)
                       and Path(h.baseFilename).parent == output_dir.resolve()]
        self._buffer: MemoryHandler | None = MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
        for handler in self._files:
            self._root.removeHandler(handler)
        self._root.addHandler(self._buffer)

    def release(self, keep: bool) -> None:
        """Write the held records to the log file (`keep`) or drop them, and log to the file directly again."""
        if self._buffer is None:
            return
        self._root.removeHandler(self._buffer)
        for handler in self._files:
            for record in self._buffer.buffer if keep else ():
                handler.handle(record)
            self._root.addHandler(handler)
        self._buffer.buffer.clear()
        self._buffer = None


def claim(run_dir: Path, continuing: bool, lock: bool = True) -> tuple[RunLock | None, bool]:
    """Take `run_dir` for this process: its lock (a second process on the directory is refused), and a
    check that a directory holding a run is only ever continued, never reused by a new run.

    Args:
        run_dir: the run directory (must exist).
        continuing: this command continues the run in `run_dir` (a resume, or its checkpoint named).
        lock: take the lock (False for the processes of a distributed job other than rank 0).

    Returns:
        The lock (None if not taken) and whether the directory is new (held no run).
    """
    held = RunLock(run_dir) if lock else None
    fresh = not holds_run(run_dir)
    if not (fresh or continuing):
        if held is not None:
            held.release()
        raise RunDirError(f"{run_dir}: the directory already holds a run; continue it with trainer.resume=true "
                          f"(or ckpt_path={run_dir}), or start a new run in a new directory (leave out "
                          "hydra.run.dir for a timestamped one)")
    if held is not None:
        if fresh:  # a continued run announces itself once accepted, leaving a refused command's target untouched
            held.announce()
        for path in remove_stale_temporaries(run_dir / "checkpoints"):
            log.info("Removed %s, left by a process that was killed while writing a checkpoint", path)
    return held, fresh


def discard_if_empty(output_dir: Path) -> None:
    """Remove a new run's directory that a refused command left with nothing but its lock and log."""
    if {p.name for p in output_dir.iterdir()} <= {LOCK_NAME, "train.log"}:
        for name in (LOCK_NAME, "train.log"):
            (output_dir / name).unlink(missing_ok=True)
        output_dir.rmdir()
