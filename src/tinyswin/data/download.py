"""Downloading the datasets tinyswin knows (``tinyswin download``): resumable, checked, renamed into place.

A download goes to ``NAME.part`` beside its final name. A ``.part`` left by an interrupted download is
resumed with an HTTP Range request (a server that ignores the range sends the whole file: the download starts
over).
Once every byte is in, the size and the checksums are checked against the published values, and only then is
the ``.part`` renamed to the final name: a failed or wrong download never leaves a file that looks complete.
A network failure keeps the ``.part`` for the next attempt; a wrong size or checksum removes it.

Known datasets (:data:`KNOWN_DATASETS`) go by default to :func:`default_download_dir`
(``cache_root()/downloads``, that is ``~/.cache/tinyswin/downloads`` unless ``$TINYSWIN_CACHE`` or
``$XDG_CACHE_HOME`` says otherwise). ``url`` names a mirror of the official file (still checked against the
published size and checksums); ``sha256`` is for a file that is not the official one (then only that checksum
is checked). One process downloads a file at a time (a lock file ``.NAME.lock`` beside it); another waits for
it and then finds the file in place.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from filelock import FileLock, Timeout
from tqdm import tqdm

from tinyswin.errors import TinyswinError, disk_full_cause, disk_full_error, disk_full_reason, one_line
from tinyswin.paths import cache_root
from tinyswin.version import __version__

CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT = 60.0  # seconds without a byte before a download counts as stalled


class DownloadError(TinyswinError):
    """A download that failed (network, HTTP status) or gave the wrong file (size, checksum); one line."""


@dataclass(frozen=True)
class KnownDataset:
    """An official dataset archive and its published size and checksums.

    Attributes:
        name: the name on the command line (``tinyswin download NAME``, ``train --data NAME``).
        url: the official address.
        file_name: the archive's file name.
        size: its size in bytes, where published.
        checksums: (algorithm, lower-case hex digest) pairs, every one checked.
    """

    name: str
    url: str
    file_name: str
    size: int | None
    checksums: tuple[tuple[str, str], ...]


KNOWN_DATASETS: Mapping[str, KnownDataset] = MappingProxyType(
    {
        "tiny-imagenet": KnownDataset(
            name="tiny-imagenet",
            url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            file_name="tiny-imagenet-200.zip",
            # the size cs231n.stanford.edu serves (Content-Length, as torchvision's downloader prints it)
            size=248_100_043,
            # md5 of ContinualAI/avalanche, avalanche/benchmarks/datasets/tiny_imagenet/tiny_imagenet.py
            checksums=(("md5", "90528d7ca1a48142e341f4ef8d21d0de"),),
        ),
        "cifar10": KnownDataset(
            name="cifar10",
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            file_name="cifar-10-python.tar.gz",
            # the size www.cs.toronto.edu serves (Content-Length; "163 MB" on the CIFAR page)
            size=170_498_071,
            checksums=(
                # md5: the CIFAR page and pytorch/vision torchvision/datasets/cifar.py (tgz_md5)
                ("md5", "c58f30108f718f92721af3b95e74349a"),
                # sha256: pytorch/vision torchvision/prototype/datasets/_builtin/cifar.py (_SHA256), and
                # keras-team/keras keras/datasets/cifar10.py (file_hash)
                ("sha256", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
            ),
        ),
        "cifar100": KnownDataset(
            name="cifar100",
            url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            file_name="cifar-100-python.tar.gz",
            # the size www.cs.toronto.edu serves (Content-Length; "161 MB" on the CIFAR page)
            size=169_001_437,
            checksums=(
                # md5: the CIFAR page and pytorch/vision torchvision/datasets/cifar.py (tgz_md5)
                ("md5", "eb9058c3a382ffc7106e4002c42a8d85"),
                # sha256: pytorch/vision torchvision/prototype/datasets/_builtin/cifar.py (_SHA256), and
                # keras-team/keras keras/datasets/cifar100.py (file_hash)
                ("sha256", "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),
            ),
        ),
    }
)


def default_download_dir() -> Path:
    """Where ``tinyswin download`` puts archives by default: ``cache_root()/downloads``."""
    return cache_root() / "downloads"


def known_dataset(name: str) -> KnownDataset:
    """The known dataset called ``name``.

    Raises:
        ValueError: no known dataset has that name (the message lists them).
    """
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}: tinyswin downloads {', '.join(KNOWN_DATASETS)}")
    return KNOWN_DATASETS[name]


def archive_path(name: str, to: str | os.PathLike[str] | None = None) -> Path:
    """Where the archive of the known dataset ``name`` is downloaded: ``to`` (default:
    :func:`default_download_dir`) / its file name."""
    folder = Path(to).expanduser() if to is not None else default_download_dir()
    return folder / known_dataset(name).file_name


# ----------------------------------------------------------------------------------------------- checks


def file_digests(path: Path, algorithms: list[str]) -> dict[str, str]:
    """The hex digests of a file, one per algorithm (hashlib names), in one pass."""
    hashes = {algo: hashlib.new(algo, usedforsecurity=False) for algo in algorithms}
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            for h in hashes.values():
                h.update(block)
    return {algo: h.hexdigest() for algo, h in hashes.items()}


def check_file(path: Path, size: int | None, checksums: tuple[tuple[str, str], ...]) -> str | None:
    """What is wrong with a file against its expected size and checksums, or None if it matches."""
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        return f"size mismatch: {got_size:,} bytes, expected {size:,}"
    got = file_digests(path, [algo for algo, _ in checksums])
    for algo, expected in checksums:
        if got[algo] != expected.lower():
            return f"checksum mismatch: {algo} expected {expected.lower()}, got {got[algo]}"
    return None


def _checked_names(checksums: tuple[tuple[str, str], ...]) -> str:
    return " and ".join(algo for algo, _ in checksums) or "no checksum"


def _parse_sha256(text: str) -> str:
    value = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"--sha256 {text!r} is not a sha256 digest (64 hexadecimal digits)")
    return value


# ----------------------------------------------------------------------------------------------- transfer


def _reason(exc: BaseException) -> str:
    """A few words for a network failure: 'connection refused', 'timed out', ..."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (ConnectionResetError, http.client.RemoteDisconnected)):
        return "connection reset"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed early"
    if isinstance(exc, socket.gaierror):
        return f"host not found ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return one_line(exc)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@dataclass
class _Transfer:
    """One HTTP request's answer: where the body starts in the file, the file's full size, the response."""

    offset: int
    total: int | None
    response: http.client.HTTPResponse


def _total_from_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, full size) from a Content-Range header ``bytes 100-199/200`` (None where unknown)."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    return int(match.group(1)), (None if match.group(2) == "*" else int(match.group(2)))


def _request(url: str, offset: int, timeout: float, log: Callable[[str], None]) -> _Transfer:
    """Ask for the file from byte ``offset`` (0: all of it).

    A server that answers a range request with the whole file (status 200) or with another range restarts
    the download from byte 0; one that refuses the range (416) is asked again for the whole file.

    Raises:
        DownloadError: an HTTP error status or a network failure.
    """
    headers = {"User-Agent": f"tinyswin/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            log(f"{url} cannot resume from byte {offset:,} (HTTP 416): starting over")
            return _request(url, 0, timeout, log)
        raise DownloadError(f"HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"network error: cannot download {url} ({_reason(exc)})") from None
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if response.status == 206 and offset:
        start, total = _total_from_range(response.headers.get("Content-Range"))
        if start == offset:
            return _Transfer(offset, total, response)
        response.close()
        log(f"{url} answered another range than asked: starting over")
        return _request(url, 0, timeout, log)
    if response.status != 200:
        response.close()
        raise DownloadError(f"HTTP {response.status} {response.reason} from {url}: expected the file itself")
    if offset:
        log(f"{url} does not resume downloads (it ignored the range request): starting over")
    return _Transfer(0, length, response)


def _copy_body(transfer: _Transfer, out: BinaryIO, bar: tqdm, url: str) -> int:
    """Write the response body to ``out``; returns the file's size so far.

    Raises:
        DownloadError: the connection failed or closed before the full size arrived (what came is kept).
    """
    done = transfer.offset
    read = getattr(transfer.response, "read1", transfer.response.read)  # read1: what arrived, kept at once
    while True:
        try:
            block = read(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            of = f" of {transfer.total:,}" if transfer.total else ""
            raise DownloadError(
                f"network error while downloading {url} ({_reason(exc)} after {done:,}{of} bytes); run the "
                "same command again to resume"
            ) from None
        if not block:
            break
        out.write(block)
        done += len(block)
        bar.update(len(block))
    if transfer.total is not None and done < transfer.total:
        raise DownloadError(
            f"network error while downloading {url} (connection closed after {done:,} of {transfer.total:,} "
            "bytes); run the same command again to resume"
        )
    return done


def _fetch_into(
    url: str, part: Path, size: int | None, *, timeout: float, progress: bool, log: Callable[[str], None]
) -> None:
    """Bring ``part`` to the full file, resuming from what it holds.

    Raises:
        DownloadError: network or HTTP failure (``part`` keeps what arrived), or a server that offers a file
            of another size than ``size`` (``part`` removed).
    """
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if size is not None and offset == size:
        return  # every byte arrived before; the checks come next
    transfer = _request(url, offset, timeout, log)
    with transfer.response:
        if size is not None and transfer.total is not None and transfer.total != size:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"size mismatch: {url} offers {transfer.total:,} bytes, expected {size:,}; is it the "
                "official file? (pass --sha256 for one that is not)"
            )
        total = transfer.total if transfer.total is not None else size
        on_terminal = sys.stderr is not None and sys.stderr.isatty()
        if progress and not on_terminal:
            start = f" from byte {transfer.offset:,}" if transfer.offset else ""
            log(f"downloading {url}{start} ({_mb(total) if total else 'size unknown'}) to {part.parent}")
        bar = tqdm(
            total=total,
            initial=transfer.offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not (progress and on_terminal),
            file=sys.stderr,
        )
        with bar, open(part, "ab" if transfer.offset else "wb") as out:
            try:
                _copy_body(transfer, out, bar, url)
            finally:
                out.flush()
                os.fsync(out.fileno())


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    size: int | None = None,
    checksums: tuple[tuple[str, str], ...] = (),
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download ``url`` to ``dest``: resumable, checked, renamed into place only when right.

    Args:
        url: the address (http, https, or anything urllib opens).
        dest: the final file.
        size: the expected size in bytes (None: not checked).
        checksums: (algorithm, hex digest) pairs, every one checked (e.g. ``(("sha256", "6d95..."),)``).
        progress: a progress bar on a terminal (one line elsewhere).
        log: where the notes go (what was found, resumed, downloaded); None: nowhere.
        timeout: seconds of silence from the server before giving up (the ``.part`` is kept).

    Returns:
        ``dest``.

    Raises:
        DownloadError: a network failure or an HTTP error status (one line naming the URL; a ``.part`` keeps
            what arrived), a file of the wrong size or checksum (its ``.part`` removed), or an existing
            ``dest`` that does not match.
        DiskFullError: no space left (the ``.part`` keeps what was written).
    """
    dest = Path(dest).expanduser()
    say = log if log is not None else (lambda _msg: None)
    blocking = next((p for p in dest.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"cannot download into {dest.parent}: {blocking} is a file")
    lock = FileLock(str(dest.parent / f".{dest.name}.lock"))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            say(f"waiting for another download of {dest} to finish")
            lock.acquire()
    except OSError as exc:
        raise ValueError(
            f"cannot download into {dest.parent} ({exc.strerror or type(exc).__name__}); choose another --to"
        ) from exc
    try:
        return _download_locked(url, dest, size, checksums, timeout=timeout, progress=progress, log=say)
    finally:
        lock.release()


def _download_locked(
    url: str,
    dest: Path,
    size: int | None,
    checksums: tuple[tuple[str, str], ...],
    *,
    timeout: float,
    progress: bool,
    log: Callable[[str], None],
) -> Path:
    checked = _checked_names(checksums)
    if dest.exists():
        problem = check_file(dest, size, checksums)
        if problem is not None:
            raise DownloadError(
                f"{dest} exists but does not match ({problem}); delete it to download it again, or pass "
                "--sha256 for a file that is not the official one"
            )
        log(f"{dest}: already downloaded and verified ({checked}); not downloading it again")
        return dest
    part = dest.with_name(dest.name + ".part")
    if part.exists() and part.stat().st_size:
        log(f"resuming the partial download {part} ({_mb(part.stat().st_size)} so far)")
    try:
        _fetch_into(url, part, size, timeout=timeout, progress=progress, log=log)
    except OSError as exc:
        cause = disk_full_cause(exc)
        if cause is None:
            raise
        raise disk_full_error(
            f"no space left for {dest} ({disk_full_reason(cause)}); free some space and run the same command "
            f"again to resume ({part} keeps what arrived)",
            cause,
        ) from exc
    problem = check_file(part, size, checksums)
    if problem is not None:
        part.unlink()
        raise DownloadError(f"{problem} for {dest.name} from {url}; the download was removed")
    os.replace(part, dest)
    log(f"downloaded {url} to {dest} ({_mb(dest.stat().st_size)}, {checked} verified)")
    return dest


def download_dataset(
    name: str,
    *,
    to: str | os.PathLike[str] | None = None,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download the archive of a known dataset (``tinyswin download NAME``).

    Args:
        name: a key of :data:`KNOWN_DATASETS` ("tiny-imagenet", "cifar10", "cifar100").
        to: the folder (default: :func:`default_download_dir`).
        url: a mirror of the official file (default: the official address); still checked against the
            published size and checksums unless ``sha256`` is given.
        sha256: the sha256 of a file that is not the official one: checked instead of the published values.
        progress: a progress bar on a terminal (one line elsewhere).
        log: where the notes go; None: nowhere.
        timeout: seconds of silence from the server before giving up.

    Returns:
        The archive's path (``to``/its official file name).

    Raises:
        ValueError: an unknown name or a malformed ``sha256``.
        DownloadError, DiskFullError: see :func:`download_file`.
    """
    known = known_dataset(name)
    if sha256 is not None:
        size, checksums = None, (("sha256", _parse_sha256(sha256)),)
    else:
        size, checksums = known.size, known.checksums
    return download_file(
        url or known.url,
        archive_path(name, to),
        size=size,
        checksums=checksums,
        progress=progress,
        log=log,
        timeout=timeout,
    )


def resolve_known(
    source: str, *, download: bool = False, progress: bool = True, log: Callable[[str], None] = print
) -> Path | None:
    """The archive a dataset name stands for, downloaded only when ``download`` is asked.

    A ``source`` that names an existing file or folder is that path, never a dataset name.

    Returns:
        The archive in :func:`default_download_dir` for a known name; None for anything else.

    Raises:
        DownloadError: the archive is not downloaded and ``download`` is False (the message says how to get
            it), or the download failed.
    """
    if source not in KNOWN_DATASETS or Path(source).exists():
        return None
    path = archive_path(source)
    if path.is_file():
        return path
    if not download:
        raise DownloadError(
            f"{source} is not downloaded yet (no {path}): run `tinyswin download {source}` first, or pass "
            "--download to fetch it now"
        )
    return download_dataset(source, progress=progress, log=log)


def fetch_for_training(
    source: str | None, *, progress: bool = True, log: Callable[[str], None] = print
) -> Path | None:
    """``train --download``: download the dataset that ``data.source`` names, unless it is downloaded.

    Returns:
        The archive, or None where ``source`` is a file or folder of that name (that path is used as is).

    Raises:
        ValueError: ``source`` is not a dataset tinyswin downloads.
        DownloadError, DiskFullError: see :func:`download_file`.
    """
    if source is None or source not in KNOWN_DATASETS:
        given = "no --data (the built-in dataset)" if source is None else f"--data {source}"
        raise ValueError(
            f"--download fetches a dataset by name ({', '.join(KNOWN_DATASETS)}); {given} is not one of them"
        )
    if Path(source).exists():
        log(f"--download: {source} is a file or folder here: training on it, downloading nothing")
        return None
    return download_dataset(source, progress=progress, log=log)
