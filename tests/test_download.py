"""`tinyswin download` and `train --download` against a local HTTP server (http.server in a thread)."""

import hashlib
import io
import re
import socket
import struct
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from filelock import FileLock

from test_cifar import make_cifar_tarball
from tinyswin.cli import main
from tinyswin.data import download as dl
from tinyswin.data import load_cache
from tinyswin.data.download import DownloadError, KnownDataset, download_dataset, download_file

TINY = ["model.embed_dim=16", "model.depths=[1, 1]", "model.num_heads=[1, 2]", "model.window_size=4"]


@dataclass
class ServerState:
    """What the server serves and how it misbehaves, and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    sent: int = 0  # body bytes sent over all requests
    cut_after: int | None = None  # send this many body bytes, then drop the connection
    reset: bool = False  # drop it with a TCP reset instead of a clean close
    ignore_range: bool = False  # answer every request with the whole file


class Handler(BaseHTTPRequestHandler):
    """GET with Range support (``bytes=N-``), 404 for unknown paths, and the failures of ServerState."""

    def do_GET(self) -> None:
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        asked = self.headers.get("Range")
        state.requests.append((self.path, asked))
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if asked and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if state.cut_after is not None:
            payload = payload[: state.cut_after]
        self.wfile.write(payload)
        self.wfile.flush()
        state.sent += len(payload)
        if state.cut_after is not None:
            if state.reset:
                time.sleep(0.2)  # the client reads what was sent, then the reset comes
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[tuple[ServerState, str]]:
    """A local HTTP server in a thread; yields its state and its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()


def _small_zip(n_bytes: int = 300_000) -> bytes:
    """A zip of incompressible bytes, about ``n_bytes`` long."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n0001\n")
        zf.writestr("tiny-imagenet-200/blob.bin", np.random.default_rng(0).bytes(n_bytes))
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _one_error_line(capsys: pytest.CaptureFixture[str], command: str = "download") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tinyswin {command}: error: "), err
    return err


def test_download_checks_the_sha256_and_renames_into_place(tmp_path, server, capsys) -> None:
    state, base = server
    body = state.files["/t.zip"] = _small_zip()
    args = [
        "download",
        "tiny-imagenet",
        "--url",
        f"{base}/t.zip",
        "--sha256",
        _sha256(body),
        "--to",
        str(tmp_path),
    ]
    assert main(args) == 0
    final = tmp_path / "tiny-imagenet-200.zip"
    assert final.read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-imagenet-200.zip.lock", final.name]
    assert str(final) in capsys.readouterr().out
    assert main(args) == 0  # verified in place: no second request
    assert len(state.requests) == 1 and "already downloaded and verified" in capsys.readouterr().out


def test_a_mirror_is_checked_against_the_published_size_and_checksums(tmp_path, server, monkeypatch) -> None:
    state, base = server
    body = state.files["/c.tar.gz"] = _small_zip(50_000)
    state.files["/other.tar.gz"] = body + b"x"
    published = KnownDataset(
        "cifar10", f"{base}/none", "c.tar.gz", len(body), (("md5", hashlib.md5(body).hexdigest()),)
    )
    monkeypatch.setattr(dl, "KNOWN_DATASETS", MappingProxyType({"cifar10": published}))
    with pytest.raises(DownloadError, match=rf"size mismatch: {base}/other.tar.gz offers 50,\d+ bytes"):
        download_dataset("cifar10", to=tmp_path, url=f"{base}/other.tar.gz", progress=False)
    assert list(tmp_path.glob("c.tar.gz*")) == []  # nothing downloaded: the size was wrong from the start
    path = download_dataset("cifar10", to=tmp_path, url=f"{base}/c.tar.gz", progress=False)
    assert path.read_bytes() == body


def test_a_partial_download_resumes_with_a_range_request(tmp_path, server) -> None:
    state, base = server
    body = state.files["/t.zip"] = _small_zip()
    dest = tmp_path / "t.zip"
    (tmp_path / "t.zip.part").write_bytes(body[:100_000])
    notes: list[str] = []
    download_file(
        f"{base}/t.zip", dest, size=len(body), checksums=(("sha256", _sha256(body)),), log=notes.append
    )
    assert state.requests == [("/t.zip", "bytes=100000-")] and state.sent == len(body) - 100_000
    assert dest.read_bytes() == body and not (tmp_path / "t.zip.part").exists()
    assert "resuming the partial download" in notes[0]


def test_a_server_that_ignores_the_range_starts_over(tmp_path, server) -> None:
    state, base = server
    body = state.files["/t.zip"] = _small_zip()
    state.ignore_range = True
    (tmp_path / "t.zip.part").write_bytes(b"\0" * 1000)  # not the file's first bytes: they must not stay
    notes: list[str] = []
    download_file(
        f"{base}/t.zip", tmp_path / "t.zip", checksums=(("sha256", _sha256(body)),), log=notes.append
    )
    assert (tmp_path / "t.zip").read_bytes() == body and state.requests == [("/t.zip", "bytes=1000-")]
    assert any(
        "does not resume downloads (it ignored the range request): starting over" in note for note in notes
    )


def test_a_part_longer_than_the_file_is_refused_by_the_server_and_started_over(tmp_path, server) -> None:
    state, base = server
    body = state.files["/t.zip"] = _small_zip(20_000)
    (tmp_path / "t.zip.part").write_bytes(b"\1" * (len(body) + 10))  # a leftover of another file
    notes: list[str] = []
    download_file(
        f"{base}/t.zip",
        tmp_path / "t.zip",
        checksums=(("md5", hashlib.md5(body).hexdigest()),),
        log=notes.append,
    )
    assert (tmp_path / "t.zip").read_bytes() == body
    assert state.requests == [("/t.zip", f"bytes={len(body) + 10}-"), ("/t.zip", None)]
    assert any("(HTTP 416): starting over" in note for note in notes)


def test_a_second_download_of_the_same_file_waits_and_finds_it_done(tmp_path, server) -> None:
    state, base = server
    body = state.files["/t.zip"] = _small_zip(20_000)
    dest = tmp_path / "t.zip"
    other = FileLock(str(tmp_path / ".t.zip.lock"))  # another process downloading the same file
    other.acquire()
    notes: list[str] = []
    result: list[Path] = []
    checks = (("sha256", _sha256(body)),)
    thread = threading.Thread(
        target=lambda: result.append(download_file(f"{base}/t.zip", dest, checksums=checks, log=notes.append))
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not notes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert notes == [f"waiting for another download of {dest} to finish"] and thread.is_alive()
    dest.write_bytes(body)  # the other process finished
    other.release()
    thread.join(10)
    assert result == [dest] and state.requests == [] and "already downloaded and verified" in notes[-1]


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_cut_connection_is_one_line_and_the_rerun_resumes(tmp_path, server, capsys, reset) -> None:
    state, base = server
    body = state.files["/t.zip"] = _small_zip()
    state.cut_after, state.reset = len(body) // 2, reset
    url = f"{base}/t.zip"
    args = [
        "download",
        "tiny-imagenet",
        "--url",
        url,
        "--sha256",
        _sha256(body),
        "--to",
        str(tmp_path),
        "--quiet",
    ]
    assert main(args) == 2
    err = _one_error_line(capsys)
    assert f"network error while downloading {url} (connection" in err and "again to resume" in err
    part = tmp_path / "tiny-imagenet-200.zip.part"
    kept = part.read_bytes()
    assert not (tmp_path / "tiny-imagenet-200.zip").exists() and 0 < len(kept) <= len(body) // 2
    assert kept == body[: len(kept)]
    state.cut_after = None
    assert main(args) == 0
    assert state.requests[-1] == ("/t.zip", f"bytes={len(kept)}-")
    assert (tmp_path / "tiny-imagenet-200.zip").read_bytes() == body and not part.exists()


def test_http_404_is_one_line_naming_status_and_url(tmp_path, server, capsys) -> None:
    _, base = server
    assert main(["download", "cifar100", "--url", f"{base}/missing.tar.gz", "--to", str(tmp_path)]) == 2
    err = _one_error_line(capsys)
    assert f"HTTP 404 Not Found from {base}/missing.tar.gz" in err
    assert [p.name for p in tmp_path.iterdir()] == [".cifar-100-python.tar.gz.lock"]


def test_a_wrong_checksum_is_one_line_and_leaves_no_file(tmp_path, server, capsys) -> None:
    state, base = server
    body = state.files["/t.zip"] = _small_zip()
    wrong = "0" * 64
    assert (
        main(
            ["download", "tiny-imagenet", "--url", f"{base}/t.zip", "--sha256", wrong, "--to", str(tmp_path)]
        )
        == 2
    )
    err = _one_error_line(capsys)
    assert f"checksum mismatch: sha256 expected {wrong}, got {_sha256(body)}" in err and "removed" in err
    assert [p.name for p in tmp_path.iterdir()] == [".tiny-imagenet-200.zip.lock"]


def test_connection_refused_and_timeout_name_the_url(tmp_path, capsys) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/t.zip"
    assert main(["download", "cifar10", "--url", url, "--to", str(tmp_path)]) == 2
    assert f"network error: cannot download {url} (connection refused)" in _one_error_line(capsys)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/t.zip"
        with pytest.raises(DownloadError, match=rf"cannot download {re.escape(url)} \(timed out\)"):
            download_file(url, tmp_path / "t.zip", timeout=0.3, progress=False)
    assert not list(tmp_path.glob("*.zip"))


def test_an_existing_file_that_does_not_match_is_left_alone(tmp_path, server, capsys) -> None:
    state, base = server
    state.files["/t.zip"] = _small_zip()
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(b"mine")
    assert main(["download", "tiny-imagenet", "--url", f"{base}/t.zip", "--to", str(tmp_path)]) == 2
    assert "exists but does not match (size mismatch: 4 bytes, expected 248,100,043)" in _one_error_line(
        capsys
    )
    assert (tmp_path / "tiny-imagenet-200.zip").read_bytes() == b"mine" and state.requests == []
    assert main(["download", "mnist"]) == 2
    assert "unknown dataset 'mnist': tinyswin downloads tiny-imagenet, cifar10, cifar100" in _one_error_line(
        capsys
    )


def test_train_never_downloads_without_the_flag(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--data", "cifar10", "--out", str(tmp_path / "run")]) == 2
    err = _one_error_line(capsys, "train")
    assert (
        "cifar10 is not downloaded yet" in err
        and "`tinyswin download cifar10`" in err
        and "--download" in err
    )
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.usefixtures("one_thread")
def test_train_download_fetches_prepares_and_trains(tmp_path, server, monkeypatch, capsys) -> None:
    state, base = server
    tarball = tmp_path / "src.tar.gz"
    expected = make_cifar_tarball(tarball, "cifar10", per_batch=4, n_test=6)
    body = state.files["/cifar.tar.gz"] = tarball.read_bytes()
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "cache"))
    mirror = KnownDataset(
        "cifar10", f"{base}/cifar.tar.gz", "cifar-10-python.tar.gz", len(body), (("sha256", _sha256(body)),)
    )
    monkeypatch.setattr(dl, "KNOWN_DATASETS", MappingProxyType({**dl.KNOWN_DATASETS, "cifar10": mirror}))
    run = tmp_path / "run"
    args = ["train", "--data", "cifar10", "--download", "--out", str(run), "--epochs", "1", "--quiet"]
    assert main([*args, "data.size=32", "batch_size=10", "tensorboard=false", *TINY]) == 0
    archive = tmp_path / "cache" / "downloads" / "cifar-10-python.tar.gz"
    assert archive.read_bytes() == body and len(state.requests) == 1
    (cache_dir,) = (p for p in (tmp_path / "cache").iterdir() if p.name.startswith("cifar-10-python-"))
    cache = load_cache(cache_dir)
    assert cache.class_names == expected["train"][2]
    assert np.array_equal(cache.split("val")[0], expected["val"][0])
    assert (run / "last.pt").is_file() and "downloaded" in capsys.readouterr().out
