"""Fetch the public dataset archives: `metalearn-data download <name> --root DIR` and `metalearn-data list`.

`--root` is the dataset's own folder (what a loader's `root` names, by default `<paths.data_dir>/<name>`);
the archives land directly in it. Each file is streamed to `<file>.part`, resumed with an HTTP Range
request, retried with exponential backoff on transient failures, checked against the registry's checksum
and only then renamed into place, so a file under its final name is always complete and verified.
Omniglot's two small background sets belong to `omniglot` rather than a name of their own: they add
about 3 MB, and with all four archives every split scheme of the loader works.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from tqdm import tqdm

Algorithm = Literal["md5", "sha256"]
CHUNK = 1 << 16
USER_AGENT = "metalearn-data/0.1 (+urllib)"
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"


class DownloadError(RuntimeError):
    """A dataset could not be fetched; the message is one line that says what to do."""


class ChecksumError(DownloadError):
    """A downloaded or present file does not have the registry's checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: its name on disk, its upstream URL and its checksum."""

    filename: str
    url: str
    checksum: str
    algorithm: Algorithm = "sha256"

    def url_from(self, mirror: str | None) -> str:
        """The URL to fetch: `<mirror>/<filename>` if a mirror is given, else the upstream URL."""
        return f"{mirror.rstrip('/')}/{self.filename}" if mirror else self.url


@dataclass(frozen=True)
class Dataset:
    """A registry entry: the files to fetch, or (`manual`) instructions for a dataset nobody may host."""

    description: str
    files: tuple[RemoteFile, ...] = ()
    manual: Callable[[Path], str] | None = None  # set: cannot be downloaded; says where to put the files


def miniimagenet_layout(root: Path) -> str:
    """Where miniImageNet's images must be put by hand, as one line (for the CLI and for a loader).

    Args:
        root: the miniImageNet folder (by default `<paths.data_dir>/miniimagenet`).

    Returns:
        The instructions, naming `root/images/<filename>.jpg` and the split CSVs that ship with metalearn.
    """
    csvs = resources.files("metalearn.data").joinpath("splits", "miniimagenet_ravi")
    return (f"miniimagenet cannot be downloaded (the ImageNet terms forbid redistributing it): obtain the "
            f"images under those terms and put them, flat, at {root / 'images'}/<filename>.jpg, named exactly "
            f"as in the Ravi & Larochelle split CSVs that ship with metalearn ({csvs}/{{train,val,test}}.csv, "
            f"column filename, e.g. {root / 'images' / 'n0153282900000005.jpg'}); 60,000 images in all")


DATASETS: dict[str, Dataset] = {
    "omniglot": Dataset(
        "Omniglot (Lake et al., 2015): full background and evaluation sets, and the two small background sets",
        (
            RemoteFile("images_background.zip", f"{OMNIGLOT_URL}/images_background.zip",
                       "68d2efa1b9178cc56df9314c21c6e718", "md5"),
            RemoteFile("images_evaluation.zip", f"{OMNIGLOT_URL}/images_evaluation.zip",
                       "6b91aef0f799c5bb55b94e3f2daec811", "md5"),
            RemoteFile("images_background_small1.zip", f"{OMNIGLOT_URL}/images_background_small1.zip",
                       "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"),
            RemoteFile("images_background_small2.zip", f"{OMNIGLOT_URL}/images_background_small2.zip",
                       "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f"),
        ),
    ),
    "cifar100": Dataset(
        "CIFAR-100 (Krizhevsky, 2009), python version; the source of CIFAR-FS and FC100",
        (RemoteFile("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                    "eb9058c3a382ffc7106e4002c42a8d85", "md5"),),
    ),
    "miniimagenet": Dataset(
        "miniImageNet (Vinyals et al., 2016), Ravi & Larochelle split; images must be supplied by hand",
        manual=miniimagenet_layout,
    ),
}


def digest(path: Path, algorithm: Algorithm) -> str:
    """The hex checksum of a file.

    Args:
        path: the file to hash.
        algorithm: "md5" or "sha256".

    Returns:
        The lowercase hex digest.
    """
    # md5 only identifies the official archives here; it is not a security check (FIPS builds need the flag).
    h = hashlib.new(algorithm, usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _transient(ex: BaseException) -> bool:
    """Whether a failure is worth retrying: network trouble and server-side errors, not 404s or disk errors."""
    if isinstance(ex, urllib.error.HTTPError):
        return ex.code >= 500 or ex.code in (408, 429)
    return isinstance(ex, (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException))


def _transfer(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One request: extend `part` from its current size with a Range request, or rewrite it if the server
    sends the whole file. Raises on a failed request or a body shorter than announced."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as ex:
        if ex.code == 416 and offset:
            return  # nothing left past the offset: the part looks complete, and the checksum decides
        raise
    with response:
        start = offset if response.status == 206 else 0
        content_range = response.headers.get("Content-Range", "")
        if start and not content_range.startswith(f"bytes {offset}-"):
            part.unlink()  # a range we did not ask for cannot be appended; begin again on the next attempt
            raise http.client.HTTPException(f"unexpected Content-Range {content_range!r}")
        length = response.headers.get("Content-Length")
        total = start + int(length) if length else None
        # A server that ignores Range answers 200 with the whole body, so the part is rewritten, not appended.
        with part.open("ab" if start else "wb") as f, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
            desc=part.name.removesuffix(".part"), disable=None if progress else True,  # None: off unless a TTY
        ) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConnectionResetError(f"connection closed after {size} of {total} bytes")


def _already_there(file: RemoteFile, dest: Path, by_hand: str) -> bool:
    """Whether `dest` holds the verified file; a different file there is an error, never overwritten
    (someone put it there: the repacked Omniglot zips in shared/data, for instance, are valid but differ)."""
    if not dest.is_file():
        return False
    actual = digest(dest, file.algorithm)
    if actual != file.checksum:
        raise ChecksumError(f"{dest} is already there but its {file.algorithm} is {actual}, not {file.checksum}; "
                            f"move it away and run again to fetch the official file, {by_hand}")
    return True


def fetch(
    file: RemoteFile, root: Path, *, mirror: str | None = None, retries: int = 3, backoff: float = 1.0,
    timeout: float = 60.0, progress: bool = True, sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Download one file into `root`, resuming and retrying, and move it into place once its checksum is right.

    Args:
        file: the registry entry.
        root: destination folder (created if missing).
        mirror: fetch `<mirror>/<filename>` instead of the upstream URL.
        retries: further attempts after a transient failure (URLError, reset connection, HTTP 5xx).
        backoff: the first retry waits this many seconds, each later one twice as long.
        timeout: socket timeout in seconds.
        progress: show a progress bar on a terminal.
        sleep: how to wait between attempts (tests pass a recorder).

    Returns:
        True if the file was downloaded, False if a verified copy was already there.
    """
    if retries < 0:
        raise ValueError(f"retries={retries}: must be >= 0")
    url, dest = file.url_from(mirror), root / file.filename
    by_hand = f"or download it by hand from {url} and place it at {dest}"
    if _already_there(file, dest, by_hand):
        return False
    root.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, progress)
            break
        except Exception as ex:
            if isinstance(ex, urllib.error.HTTPError) and not _transient(ex):
                raise DownloadError(f"{file.filename}: fetching {url} failed ({ex}); check the URL, {by_hand}") from ex
            if not _transient(ex):
                raise  # a local problem (disk full, permissions) that retrying would not fix
            if attempt == retries:
                later = f"run again later to resume from {part}" if part.exists() else "run again later"
                raise DownloadError(f"{file.filename}: fetching {url} failed after {retries + 1} attempts ({ex}); "
                                    f"{later}, {by_hand}") from ex
            sleep(backoff * 2**attempt)
    actual = digest(part, file.algorithm)
    if actual != file.checksum:
        part.unlink()
        raise ChecksumError(f"{file.filename}: {file.algorithm} mismatch (expected {file.checksum}, got {actual}); "
                            f"the download is corrupt or the file at {url} has changed; run again to retry, {by_hand}")
    os.replace(part, dest)  # same directory, so the rename is atomic: dest is complete or absent
    return True


def _downloadable(name: str, root: Path, registry: Mapping[str, Dataset]) -> Dataset:
    """The registry entry `name`; DownloadError for an unknown name or a dataset that must be fetched by
    hand (its message says where the files go under `root`)."""
    if name not in registry:
        raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(sorted(registry))}")
    entry = registry[name]
    if entry.manual is not None:
        raise DownloadError(entry.manual(root))
    return entry


def download(
    name: str, root: Path, *, retries: int = 3, backoff: float = 1.0, timeout: float = 60.0,
    mirror: str | None = None, progress: bool = True, registry: Mapping[str, Dataset] = DATASETS,
    sleep: Callable[[float], None] = time.sleep, only: Sequence[str] | None = None,
) -> list[Path]:
    """Make sure every file of dataset `name` is in `root`, verified; fetch the missing ones.

    Args:
        name: a registry key (`omniglot`, `cifar100`).
        root: the dataset's folder (created if missing).
        only: restrict to these file names (None: all of the dataset's files).
        retries, backoff, timeout, mirror, progress, sleep: as for `fetch`.
        registry: the entries to choose from (tests pass their own).

    Returns:
        The paths of the dataset's files, in registry order.
    """
    entry = _downloadable(name, root, registry)
    files = [file for file in entry.files if only is None or file.filename in only]
    for file in files:
        fetch(file, root, mirror=mirror, retries=retries, backoff=backoff, timeout=timeout, progress=progress,
              sleep=sleep)
    return [root / file.filename for file in files]


def main(argv: Sequence[str] | None = None, *, registry: Mapping[str, Dataset] = DATASETS) -> int:
    """The `metalearn-data` command.

    Args:
        argv: arguments without the program name (None: sys.argv[1:]).
        registry: the datasets offered (tests pass their own).

    Returns:
        0 on success, 2 after printing one `error: ...` line to stderr.
    """
    parser = argparse.ArgumentParser(prog="metalearn-data", description="Fetch the public dataset archives.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the datasets and their files")
    get = commands.add_parser("download", help="fetch a dataset's archives into --root")
    get.add_argument("name", help="dataset name (see `metalearn-data list`)")
    get.add_argument("--root", type=Path, required=True, help="the dataset's folder, e.g. data/omniglot")
    get.add_argument("--retries", type=int, default=3, help="retries after a transient failure (default 3)")
    get.add_argument("--mirror", help="fetch <mirror>/<filename> instead of the upstream URLs")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, listed in registry.items():
            print(f"{name}: {listed.description}" + ("" if listed.files else " (not downloadable)"))
            print("".join(f"  {f.filename}  {f.algorithm}:{f.checksum}  {f.url}\n" for f in listed.files), end="")
        return 0
    try:
        entry = _downloadable(args.name, args.root, registry)
        for file in entry.files:
            fetched = fetch(file, args.root, mirror=args.mirror, retries=args.retries)
            print(f"{'fetched' if fetched else 'already there, checksum ok:'} {args.root / file.filename}")
    except (DownloadError, OSError, ValueError) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    print(f"{args.name}: {len(entry.files)} files verified in {args.root}")
    return 0


if __name__ == "__main__":  # `python -m metalearn.data.download`: the same command, the same exit status
    sys.exit(main())
