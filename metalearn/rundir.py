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
import os
from pathlib import Path

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
