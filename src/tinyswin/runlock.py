"""Who may use a run directory: what a folder holds (a run or not), and the OS file lock that one training
takes on it.

    RUN_DIR/.lock           the OS file lock of the training that owns the directory
    RUN_DIR/.lock.pid       its pid and host, for the message another training gets

`RunLock.acquire` takes an OS file lock (`flock`, which the OS drops when the process ends, however it ends)
without waiting and refuses a directory that another training holds, a directory that is not a run, a new
run over an old one, and a resume with nothing to resume, before it writes anything; `release(undo=True)`
removes what a refused `acquire` made, so a refusal leaves nothing behind.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from filelock import FileLock, Timeout

from tinyswin.checkpoint import is_temp_name, remove_stale_temps, write_text_atomic
from tinyswin.errors import RunDirError, disk_full_cause, disk_full_error, disk_full_reason
from tinyswin.trackers import STATE_FILE

LOCK_NAME = ".lock"
LOCK_PID_NAME = ".lock.pid"
# what a run writes besides its lock: any of them in a directory means a run was there
RUN_FILES = frozenset(
    {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "plots", "tensorboard", STATE_FILE}
)


def _files(n: int) -> str:
    return f"{n} other file" if n == 1 else f"{n} other files"


@dataclass(frozen=True)
class DirContents:
    """What `--out` holds, as far as telling a run from anything else goes.

    Attributes:
        exists: the directory exists.
        run_files: the names a run writes that it holds (config.yaml, last.pt, ...).
        others: the names that are neither a run's files, nor its lock, nor temporary files of atomic writes.
        lock: it holds `.lock`: a training took it (and may have died before writing anything).
    """

    exists: bool
    run_files: tuple[str, ...] = ()
    others: tuple[str, ...] = ()
    lock: bool = False

    @property
    def is_run(self) -> bool:
        """A tinyswin run: it holds last.pt, or files a run writes and nothing else."""
        return "last.pt" in self.run_files or (bool(self.run_files) and not self.others)


def inspect_dir(path: Path) -> DirContents:
    """Read (never write) what `path` holds.

    Raises:
        RunDirError: `path` exists and is not a directory, or cannot be read.
    """
    if not path.exists():
        if path.is_symlink():
            raise RunDirError(f"--out {path} is a broken symbolic link: choose another --out")
        return DirContents(exists=False)
    if not path.is_dir():
        raise RunDirError(f"--out {path} is a file, not a directory: choose another --out")
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror}") from None
    own = RUN_FILES | {LOCK_NAME, LOCK_PID_NAME}
    return DirContents(
        exists=True,
        run_files=tuple(n for n in names if n in RUN_FILES),
        others=tuple(n for n in names if n not in own and not is_temp_name(n)),
        lock=LOCK_NAME in names,
    )


def check_usable(path: Path, contents: DirContents, resume: bool) -> None:
    """Refuse a directory that a new run (or, with `resume`, a resumed one) cannot use.

    Raises:
        RunDirError: one line saying what is wrong and what to do.
    """
    if resume:
        if not contents.exists:
            raise RunDirError(f"nothing to resume in {path}: it does not exist")
        if contents.is_run or (contents.lock and not contents.others):
            return
        if contents.others:
            raise RunDirError(
                f"nothing to resume in {path}: it is not a tinyswin run directory "
                f"(it holds {_files(len(contents.others))})"
            )
        raise RunDirError(f"nothing to resume in {path}: it is empty")
    if contents.is_run:
        raise RunDirError(f"{path} already holds a run: resume it with --resume or choose another --out")
    if contents.others:
        raise RunDirError(
            f"{path} is not a tinyswin run directory (it holds {_files(len(contents.others))}); "
            "choose another --out"
        )


class RunLock:
    """The lock of one run directory, taken by the training that writes it (rank 0).

    Args:
        path: the run directory (created by `acquire` if it does not exist).
        guard: `guard(path)` turns running out of space while writing `path` into the run's one line.
    """

    def __init__(self, path: Path, guard: Callable[[Path], AbstractContextManager[None]]) -> None:
        self.path = path
        self.lock_file = path / LOCK_NAME
        self.pid_file = path / LOCK_PID_NAME
        self._guard = guard
        self._lock: FileLock | None = None
        self._created: list[Path] = []  # made by `acquire` (the folder, .lock): removed if it fails

    @property
    def locked(self) -> bool:
        """This process holds the directory's lock."""
        return self._lock is not None

    def acquire(self, resume: bool) -> None:
        """Create the folder if needed, take the lock without waiting, check the directory again under it,
        record this process in .lock.pid and remove temporary files left by killed writes.

        Raises:
            RunDirError: another training holds the directory (naming its pid), or it cannot be used.
            DiskFullError: no space to create the lock's files.
        """
        if self._lock is not None:
            raise RuntimeError(f"{self.path}: RunDir.open was called twice")
        if not self.path.exists():
            try:
                self.path.mkdir(parents=True)
            except FileExistsError:
                pass
            except OSError as exc:
                self._refuse_os_error("create", exc)
            else:
                self._created.append(self.path)
        if not self.lock_file.exists():
            self._created.append(self.lock_file)
        lock = FileLock(str(self.lock_file), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            self.release(undo=True)
            raise RunDirError(
                f"{self.path} is in use by another training ({self._holder()}): wait for it to end or "
                "choose another --out"
            ) from None
        except OSError as exc:
            self.release(undo=True)
            self._refuse_os_error("lock", exc)
        self._lock = lock
        try:
            check_usable(self.path, inspect_dir(self.path), resume)  # another training may have come and gone
            with self._guard(self.pid_file):
                write_text_atomic(self.pid_file, f"{os.getpid()} {socket.gethostname()}\n")
            self._created.append(self.pid_file)
            remove_stale_temps(self.path)
            for temp in (self.path / "plots").glob(".*.tmp"):  # tinyswin.plots' own temporary files
                temp.unlink(missing_ok=True)
        except BaseException:
            self.release(undo=True)
            raise

    def _refuse_os_error(self, action: str, exc: OSError) -> NoReturn:
        cause = disk_full_cause(exc)
        if cause is not None:
            raise disk_full_error(
                f"disk full: cannot {action} {self.path} ({disk_full_reason(cause)}): free some space",
                cause,
            ) from exc
        raise RunDirError(f"cannot {action} {self.path}: {exc.strerror or exc}") from None

    def _holder(self) -> str:
        """Who holds the lock, from .lock.pid: 'pid N' (on another host: 'pid N on HOST')."""
        try:
            pid, host = self.pid_file.read_text().split()
        except (OSError, ValueError):
            return "pid unknown"
        return f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on {host}"

    def release(self, undo: bool) -> None:
        """Drop the lock (and our .lock.pid); with `undo`, also what `open` made: a refusal leaves nothing."""
        created, self._created = self._created, []
        if self._lock is not None:
            try:
                if self.pid_file in created:
                    self.pid_file.unlink(missing_ok=True)
                if undo and self.lock_file in created:
                    self.lock_file.unlink(missing_ok=True)
            finally:
                self._lock.release()
                self._lock = None
        if undo and self.path in created:
            with suppress(OSError):
                self.path.rmdir()
