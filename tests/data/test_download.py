"""Dataset downloads against a local HTTP server: atomic landing, Range resume, retries, checksums, the CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from metalearn.data.download import (
    DATASETS,
    Algorithm,
    ChecksumError,
    Dataset,
    DownloadError,
    RemoteFile,
    digest,
    download,
    fetch,
    main,
    miniimagenet_layout,
)
from tests.conftest import DATA_DIR


@dataclass
class Behaviour:
    """What the fixture server does; the tests change it and read its request log."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    fail_first: int = 0  # answer this many requests with 503 first
    drop_after: int | None = None  # send only this many body bytes, then close the connection ...
    drops: int = 1  # ... for this many requests
    ignore_range: bool = False
    log: list[tuple[str, str | None, int, int]] = field(default_factory=list)  # path, Range, status, bytes sent


class Handler(BaseHTTPRequestHandler):
    """Serves `Behaviour.blobs` by path, with Range support and injectable failures."""

    server: Server

    def do_GET(self) -> None:
        b, name, wanted = self.server.behaviour, self.path.lstrip("/"), self.headers.get("Range")
        if b.fail_first > 0:
            b.fail_first -= 1
            return self._reply(503, b"busy", wanted)
        if name not in b.blobs:
            return self._reply(404, b"no such file", wanted)
        data = b.blobs[name]
        start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted and not b.ignore_range else 0
        if start >= len(data) and wanted and not b.ignore_range:
            return self._reply(416, b"", wanted)
        body, drop = data[start:], b.drop_after is not None and b.drops > 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop:
            b.drops -= 1
            body = body[: b.drop_after]
        # Logged before the body goes out, so the client cannot finish before the log shows the request.
        b.log.append((name, wanted, 206 if start else 200, len(body)))
        self.wfile.write(body)

    def _reply(self, status: int, body: bytes, wanted: str | None) -> None:
        self.server.behaviour.log.append((self.path.lstrip("/"), wanted, status, len(body)))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
        pass


class Server(ThreadingHTTPServer):
    behaviour: Behaviour


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    """A local server on a free port: (base URL, its behaviour)."""
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.behaviour = Behaviour()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.behaviour
    httpd.shutdown()  # returns once serve_forever has stopped
    httpd.server_close()


def blob(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that do not repeat within a chunk, so misplaced ranges change the checksum."""
    out = b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32 + 1))
    return out[:size]


def remote(base: str, behaviour: Behaviour, name: str, data: bytes, algorithm: Algorithm = "sha256") -> RemoteFile:
    """Serve `data` as `name` and describe it the way the registry would."""
    behaviour.blobs[name] = data
    return RemoteFile(name, f"{base}/{name}", hashlib.new(algorithm, data).hexdigest(), algorithm)


def test_good_download_lands_atomically(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    data = blob(300_000)
    file = remote(base, b, "a.zip", data, "md5")
    assert fetch(file, tmp_path / "new" / "dir", progress=False) is True
    assert (tmp_path / "new" / "dir" / "a.zip").read_bytes() == data
    assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["a.zip"]  # no .part left behind


def test_resume_sends_range_and_fetches_only_the_rest(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    data = blob(200_000)
    file = remote(base, b, "a.zip", data)
    (tmp_path / "a.zip.part").write_bytes(data[:70_000])
    assert fetch(file, tmp_path, progress=False)
    assert (tmp_path / "a.zip").read_bytes() == data and not (tmp_path / "a.zip.part").exists()
    assert b.log == [("a.zip", "bytes=70000-", 206, 130_000)]


def test_server_ignoring_range_restarts_from_zero(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    b.ignore_range = True
    data = blob(100_000)
    file = remote(base, b, "a.zip", data)
    # A wrong prefix proves the 200 body replaced the part instead of being appended to it.
    (tmp_path / "a.zip.part").write_bytes(b"x" * 5_000)
    assert fetch(file, tmp_path, progress=False)
    assert (tmp_path / "a.zip").read_bytes() == data
    assert b.log == [("a.zip", "bytes=5000-", 200, 100_000)]


def test_dropped_connection_resumes_on_retry(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    b.drop_after = 40_000
    data = blob(150_000)
    file = remote(base, b, "a.zip", data)
    sleeps: list[float] = []  # the backoff delays, recorded instead of waited
    assert fetch(file, tmp_path, retries=2, backoff=0.01, progress=False, sleep=sleeps.append)
    assert (tmp_path / "a.zip").read_bytes() == data
    assert b.log == [("a.zip", None, 200, 40_000), ("a.zip", "bytes=40000-", 206, 110_000)]
    assert sleeps == [0.01]


def test_complete_part_left_by_a_crash_is_verified_and_moved(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    data = blob(30_000)
    file = remote(base, b, "a.zip", data)
    (tmp_path / "a.zip.part").write_bytes(data)  # interrupted between the last byte and the rename
    assert fetch(file, tmp_path, progress=False)
    assert (tmp_path / "a.zip").read_bytes() == data and not (tmp_path / "a.zip.part").exists()
    assert b.log == [("a.zip", "bytes=30000-", 416, 0)]


def test_file_url_mirror(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "a.zip").write_bytes(blob(12_000))
    file = RemoteFile("a.zip", "http://127.0.0.1:9/a.zip", hashlib.sha256(blob(12_000)).hexdigest())
    assert fetch(file, tmp_path / "out", mirror=mirror.as_uri(), retries=0, progress=False)
    assert (tmp_path / "out" / "a.zip").read_bytes() == blob(12_000)


def test_transient_503s_are_retried_with_backoff(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    b.fail_first = 2
    file = remote(base, b, "a.zip", blob(10_000))
    sleeps: list[float] = []  # the backoff delays, recorded instead of waited
    assert fetch(file, tmp_path, retries=3, backoff=0.5, progress=False, sleep=sleeps.append)
    assert [status for *_, status, _ in b.log] == [503, 503, 200]
    assert sleeps == [0.5, 1.0]


def test_persistent_failure_gives_up_after_the_retries(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    b.fail_first = 100
    file = remote(base, b, "a.zip", blob(10_000))
    sleeps: list[float] = []  # the backoff delays, recorded instead of waited
    with pytest.raises(DownloadError, match=r"a\.zip: fetching .* failed after 3 attempts \(HTTP Error 503.*by hand"):
        fetch(file, tmp_path, retries=2, backoff=0.1, progress=False, sleep=sleeps.append)
    assert len(b.log) == 3 and sleeps == [0.1, 0.2]
    assert not (tmp_path / "a.zip").exists()


def test_missing_file_is_not_retried(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, _ = server
    file = RemoteFile("gone.zip", f"{base}/gone.zip", "0" * 64)
    sleeps: list[float] = []  # the backoff delays, recorded instead of waited
    with pytest.raises(DownloadError, match="HTTP Error 404.*check the URL"):
        fetch(file, tmp_path, retries=3, progress=False, sleep=sleeps.append)
    assert sleeps == []


def test_checksum_mismatch_leaves_nothing(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    good = remote(base, b, "a.zip", blob(50_000))
    wrong = RemoteFile("a.zip", good.url, "0" * 32, "md5")
    with pytest.raises(ChecksumError) as raised:
        fetch(wrong, tmp_path, progress=False)
    message = str(raised.value)
    actual = hashlib.md5(blob(50_000)).hexdigest()
    assert "\n" not in message
    for part in ("a.zip: md5 mismatch", "0" * 32, actual, good.url, str(tmp_path / "a.zip"), "run again"):
        assert part in message
    assert list(tmp_path.iterdir()) == []


def test_present_good_file_is_skipped(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    data = blob(20_000)
    file = remote(base, b, "a.zip", data)
    (tmp_path / "a.zip").write_bytes(data)
    assert fetch(file, tmp_path, progress=False) is False
    assert b.log == []


def test_present_wrong_file_is_kept_and_reported(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    file = remote(base, b, "a.zip", blob(20_000))
    (tmp_path / "a.zip").write_bytes(b"someone else's copy")
    with pytest.raises(ChecksumError, match="already there.*move it away"):
        fetch(file, tmp_path, progress=False)
    assert (tmp_path / "a.zip").read_bytes() == b"someone else's copy" and b.log == []


def test_download_from_a_mirror(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    files = tuple(remote(base, b, f"{n}.tar.gz", blob(5_000, seed=n)) for n in range(2))
    # Upstream URLs that cannot answer, so only the mirror can have served the files.
    unreachable = tuple(RemoteFile(f.filename, f"http://127.0.0.1:9/{f.filename}", f.checksum) for f in files)
    registry = {"fixture": Dataset("two blobs", unreachable)}
    paths = download("fixture", tmp_path, mirror=base + "/", registry=registry, retries=0, progress=False)
    assert paths == [tmp_path / "0.tar.gz", tmp_path / "1.tar.gz"]
    assert [p.read_bytes() for p in paths] == [blob(5_000, seed=0), blob(5_000, seed=1)]


def test_cli_download_end_to_end(server: tuple[str, Behaviour], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    base, b = server
    registry = {"fixture": Dataset("fixture", (remote(base, b, "x.zip", blob(9_000), "md5"),
                                               remote(base, b, "y.zip", blob(7_000, seed=1))))}
    root = tmp_path / "data" / "fixture"
    assert main(["download", "fixture", "--root", str(root)], registry=registry) == 0
    assert (root / "x.zip").read_bytes() == blob(9_000) and (root / "y.zip").read_bytes() == blob(7_000, seed=1)
    out = capsys.readouterr().out
    assert f"fetched {root / 'x.zip'}" in out and "2 files verified" in out
    assert main(["download", "fixture", "--root", str(root)], registry=registry) == 0
    assert "already there, checksum ok" in capsys.readouterr().out and len(b.log) == 2


def test_cli_miniimagenet_explains_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "miniimagenet"
    assert main(["download", "miniimagenet", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert miniimagenet_layout(root) in err
    assert str(root / "images" / "n0153282900000005.jpg") in err and "miniimagenet_ravi" in err
    assert not root.exists()


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "nope", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: unknown dataset 'nope'; known: cifar100, miniimagenet, omniglot\n"


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, entry in DATASETS.items():
        assert f"{name}: " in out
        assert all(f"{f.filename}  {f.algorithm}:{f.checksum}" in out for f in entry.files)
    assert "miniimagenet" in out and "not downloadable" in out


def test_registry_entries_are_consistent() -> None:
    for entry in DATASETS.values():
        for f in entry.files:
            assert f.url.endswith("/" + f.filename)
            assert len(f.checksum) == {"md5": 32, "sha256": 64}[f.algorithm]
            int(f.checksum, 16)
    omniglot = {f.filename: f.checksum for f in DATASETS["omniglot"].files}
    assert omniglot["images_background.zip"] == "68d2efa1b9178cc56df9314c21c6e718"
    assert omniglot["images_evaluation.zip"] == "6b91aef0f799c5bb55b94e3f2daec811"


@pytest.mark.parametrize("name", ["images_background_small1.zip", "images_background_small2.zip"])
def test_registry_matches_the_byte_exact_small_omniglot_archives(name: str) -> None:
    path = DATA_DIR / "omniglot" / name
    file = next(f for f in DATASETS["omniglot"].files if f.filename == name)
    assert digest(path, file.algorithm) == file.checksum


def test_python_m_runs_the_cli_and_exits_with_its_status(tmp_path: Path) -> None:
    """`python -m metalearn.data.download` is the CLI too: an error is one line and exit status 2, not a silent 0."""
    root = tmp_path / "miniimagenet"
    done = subprocess.run([sys.executable, "-m", "metalearn.data.download", "download", "miniimagenet", "--root",
                           str(root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: {miniimagenet_layout(root)}\n"
