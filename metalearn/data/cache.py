"""Decoded-dataset cache: build a dict of tensors once, save it atomically, load it on later starts.

A cache file's name carries a hash of everything the decoded data depends on (the source files' paths,
sizes and modification times, the image size, the split), so changed data is decoded anew instead of
being served stale, and two copies of a dataset never share a cache file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from metalearn.checkpoint import atomic_save

log = logging.getLogger(__name__)


def file_identity(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(absolute path, size, modification time in ns) of each file, for a cache key.

    Symbolic links are not resolved (that would cost a system call per path component and file).

    Args:
        paths: the files the decoded data is made from.

    Returns:
        One tuple per file, in the given order. A missing file raises FileNotFoundError.
    """
    identity = []
    for path in paths:
        stat = path.stat()
        identity.append((str(path.absolute()), stat.st_size, stat.st_mtime_ns))
    return identity


def cache_path(cache_dir: Path | None, prefix: str, identity: object) -> Path | None:
    """`<cache_dir>/<prefix>-<hash of identity>.pt`, or None when there is no cache directory.

    Args:
        cache_dir: where caches live (None: caching is off).
        prefix: a readable name, e.g. `cifar100-32px-v1` (put a format version in it).
        identity: anything whose `repr` changes when the decoded data would (see `file_identity`).

    Returns:
        The cache file's path (it may not exist yet), or None.
    """
    if cache_dir is None:
        return None
    key = hashlib.sha256(repr(identity).encode()).hexdigest()[:12]
    return cache_dir / f"{prefix}-{key}.pt"


def cached(path: Path | None, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Load the dict saved at `path`, or call `build()`, save its result there (atomically) and return it.

    Args:
        path: the cache file (None: always build, save nothing).
        build: makes the dict; its values must be tensors, numbers, strings or lists of them
            (what `torch.load(weights_only=True)` accepts).

    Returns:
        The built or loaded dict. A cache file that cannot be read (truncated, garbage, not a dict) is
        built anew and replaced, with a warning naming it.
    """
    if path is not None and path.is_file():
        try:
            loaded = torch.load(path, weights_only=True)
        except Exception as ex:  # torn, truncated or foreign: whatever the failure, decoding anew mends it
            loaded = ex
        if isinstance(loaded, dict):
            return loaded
        reason = type(loaded).__name__ if isinstance(loaded, Exception) else f"it holds a {type(loaded).__name__}"
        log.warning("Cache file %s cannot be read (%s); decoding the data anew and replacing it", path, reason)
    value = build()
    if path is not None:
        atomic_save(value, path)
        log.info("Cached decoded data in %s", path)
    return value
