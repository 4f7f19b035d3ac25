"""The run directory: one training owns it (an OS lock), a directory that cannot be used is refused before
anything is written, every file is written atomically, and a full disk leaves the previous last.pt whole."""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinyswin.rundir as rundir_module
from test_train import make_tiny_cache, tiny_run_overrides
from tinyswin.checkpoint import FORMAT, atomic_save, load_checkpoint
from tinyswin.config import load_config
from tinyswin.errors import DiskFullError, RunDirError
from tinyswin.plots import read_metrics
from tinyswin.rundir import RunDir
from tinyswin.train import train


def _ckpt(epoch: int, numel: int = 16) -> dict:
    return {
        "format": FORMAT,
        "model": {"w": torch.full((numel,), float(epoch))},
        "model_config": {"embed_dim": 8},
        "class_names": ["a", "b"],
        "epoch": epoch,
    }


def _record(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_top1": 0.1 * epoch}


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder): what 'left unchanged' compares."""
    if not folder.exists():
        return {}
    out: dict[str, bytes | None] = {".": None}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = None if p.is_dir() else p.read_bytes()
    return out


def _a_run(folder: Path, epochs: int = 2) -> Path:
    """A run directory as a training leaves it after `epochs` epochs."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "metrics.jsonl").write_text(
        "".join(json.dumps(_record(e)) + "\n" for e in range(1, epochs + 1))
    )
    atomic_save(_ckpt(epochs), folder / "last.pt")
    atomic_save(_ckpt(1), folder / "best.pt")
    return folder


def _refused(path: Path, resume: bool, match: str) -> str:
    """Open `path` and expect a one-line RunDirError matching `match`, with the directory left as it was."""
    before = _snapshot(path)
    said: list[str] = []
    rundir = RunDir(path, main=True, say=said.append)
    with pytest.raises(RunDirError, match=match) as excinfo:
        rundir.open(resume)
    message = str(excinfo.value)
    assert "\n" not in message
    assert _snapshot(path) == before, "a refused directory must be left byte-for-byte as it was"
    assert not rundir.locked and said == []
    return message


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plots are tinyswin.plots' own business (and slow): not drawn here."""
    monkeypatch.setattr(rundir_module, "plot_run", lambda _path: None)


def test_a_new_run_creates_the_directory_and_holds_its_lock(tmp_path: Path) -> None:
    path = tmp_path / "a" / "run"
    with RunDir(path, main=True, say=print) as rundir:
        assert rundir.open(resume=False) is None
        assert rundir.locked
        assert sorted(p.name for p in path.iterdir()) == [".lock", ".lock.pid"]
        assert (path / ".lock.pid").read_text().split()[0] == str(os.getpid())
        with pytest.raises(RuntimeError, match="called twice"):
            rundir.open(resume=False)
        assert rundir.locked
    assert not rundir.locked
    assert sorted(p.name for p in path.iterdir()) == [".lock"]
    rundir.close()  # closing twice does nothing
    # a directory holding only a lock (a training stopped before writing anything) takes a new run
    with RunDir(path, main=True, say=print) as again:
        assert again.open(resume=False) is None


def test_a_directory_that_is_not_a_run_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "photos"
    path.mkdir()
    (path / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    (path / "notes").mkdir()
    (path / "notes" / "todo.txt").write_text("x")
    message = _refused(path, False, "is not a tinyswin run directory")
    assert message == f"{path} is not a tinyswin run directory (it holds 2 other files); choose another --out"
    message = _refused(path, True, "nothing to resume")
    assert "not a tinyswin run directory (it holds 2 other files)" in message
    # a project folder with a config.yaml among other things is not a run either
    (path / "config.yaml").write_text("lr: 1\n")
    assert "(it holds 2 other files)" in _refused(path, True, "nothing to resume")
    assert "(it holds 2 other files)" in _refused(path, False, "is not a tinyswin run directory")


def test_a_new_run_over_an_existing_run_is_refused(tmp_path: Path) -> None:
    path = _a_run(tmp_path / "run")
    message = _refused(path, False, "already holds a run")
    assert message == f"{path} already holds a run: resume it with --resume or choose another --out"
    # a run with a file of the user's beside it is still a run
    (path / "notes.txt").write_text("lr too high?")
    _refused(path, False, "already holds a run")


def test_nothing_to_resume(tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    assert _refused(absent, True, "nothing to resume") == f"nothing to resume in {absent}: it does not exist"
    assert not absent.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _refused(empty, True, "nothing to resume") == f"nothing to resume in {empty}: it is empty"


def test_out_on_a_regular_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"weights")
    for resume in (False, True):
        message = _refused(path, resume, "is a file, not a directory")
        assert message == f"--out {path} is a file, not a directory: choose another --out"
    assert path.read_bytes() == b"weights"


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_from_the_beginning(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run"
    path.mkdir()
    (path / "config.yaml").write_text("seed: 0\n")
    (path / "metrics.jsonl").write_text("")
    said: list[str] = []
    with RunDir(path, main=True, say=said.append) as rundir:
        assert rundir.open(resume=True) is None
    assert said == [f"no checkpoint in {path} yet: starting from the beginning (nothing was lost)"]
    # killed before it wrote anything but its lock
    only_lock = tmp_path / "only-lock"
    only_lock.mkdir()
    (only_lock / ".lock").write_text("")
    said.clear()
    with RunDir(only_lock, main=True, say=said.append) as rundir:
        assert rundir.open(resume=True) is None
    assert said == [f"no checkpoint in {only_lock} yet: starting from the beginning (nothing was lost)"]


def test_resume_returns_last_pt_and_removes_stale_temporary_files(tmp_path: Path) -> None:
    path = _a_run(tmp_path / "run", epochs=3)
    (path / ".last.pt.tmp-12345").write_bytes(b"half a checkpoint")
    (path / "plots").mkdir()
    (path / "plots" / ".loss.png.tmp").write_bytes(b"half a png")
    with RunDir(path, main=True, say=print) as rundir:
        ckpt = rundir.open(resume=True)
        assert ckpt is not None and ckpt["epoch"] == 3
    assert not (path / ".last.pt.tmp-12345").exists() and not (path / "plots" / ".loss.png.tmp").exists()


def test_an_unreadable_last_pt_is_refused_and_leaves_no_lock_behind(tmp_path: Path) -> None:
    path = tmp_path / "run"
    path.mkdir()
    (path / "last.pt").write_bytes(b"not a checkpoint")
    before = _snapshot(path)
    rundir = RunDir(path, main=True, say=print)
    with pytest.raises(ValueError, match=r"run/last\.pt: "):
        rundir.open(resume=True)
    assert not rundir.locked and _snapshot(path) == before


def test_other_ranks_neither_lock_nor_write(tmp_path: Path) -> None:
    path = tmp_path / "run"
    rank1 = RunDir(path, main=False, say=print)
    assert rank1.open(resume=False) is None
    assert not path.exists() and not rank1.locked
    _a_run(path)
    with RunDir(path, main=True, say=print) as rank0:
        rank0.open(resume=True)
        ckpt = RunDir(path, main=False, say=print).open(resume=True)  # the lock is rank 0's alone
        assert ckpt is not None and ckpt["epoch"] == 2


def test_a_second_training_on_the_same_directory_is_refused_naming_the_holder(tmp_path: Path) -> None:
    path = _a_run(tmp_path / "run")
    with RunDir(path, main=True, say=print) as first:
        first.open(resume=True)
        before = _snapshot(path)
        second = RunDir(path, main=True, say=print)
        with pytest.raises(RunDirError, match="in use by another training") as excinfo:
            second.open(resume=True)
        message = str(excinfo.value)
        assert message == (
            f"{path} is in use by another training (pid {os.getpid()}): wait for it to end or choose "
            "another --out"
        )
        assert _snapshot(path) == before and not second.locked
    with RunDir(path, main=True, say=print) as third:  # released on close
        assert third.open(resume=True) is not None


_HOLDER = """
import sys, time
from tinyswin.rundir import RunDir
rundir = RunDir(sys.argv[1], main=True, say=print)
rundir.open(resume=False)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_training_killed_with_sigkill_leaves_no_stale_lock(tmp_path: Path) -> None:
    path = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"in use by another training \(pid {proc.pid}\)"):
            RunDir(path, main=True, say=print).open(resume=True)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    said: list[str] = []
    with RunDir(path, main=True, say=said.append) as rundir:
        assert rundir.open(resume=True) is None  # the OS released the lock when the holder died
        assert (path / ".lock.pid").read_text().split()[0] == str(os.getpid())
    assert said and said[0].startswith("no checkpoint in")


def test_metrics_are_rewritten_whole_and_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run"
    with RunDir(path, main=True, say=print) as rundir:
        rundir.open(resume=False)
        rundir._write_metrics([json.dumps(_record(1)) + "\n"])  # what start() writes from the history
        rundir.end_epoch(_record(2), improved=True, checkpoint=lambda: _ckpt(2))
        lines = (path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
        assert (
            load_checkpoint(path / "last.pt")["epoch"] == 2
            and load_checkpoint(path / "best.pt")["epoch"] == 2
        )
        before = (path / "metrics.jsonl").read_bytes()

        real_fsync = os.fsync

        def fsync_fails_for_metrics(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".metrics.jsonl"):
                raise OSError(28, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync_fails_for_metrics)
        with pytest.raises(DiskFullError) as excinfo:
            rundir.end_epoch(_record(3), improved=False, checkpoint=lambda: _ckpt(3))
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert str(excinfo.value) == (
            f"disk full while writing {path / 'metrics.jsonl'} (No space left on device): free some space, "
            "then resume with --resume (last.pt of epoch 3 is intact)"
        )
        assert (path / "metrics.jsonl").read_bytes() == before  # the old file, whole
        assert not [p for p in path.iterdir() if ".tmp" in p.name]
        rundir.end_epoch(_record(3), improved=False, checkpoint=lambda: _ckpt(3))
        assert len((path / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_checkpoint_is_refused_early_when_the_free_space_is_clearly_too_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run"
    with RunDir(path, main=True, say=print) as rundir:
        rundir.open(resume=False)
        rundir.end_epoch(_record(1), improved=True, checkpoint=lambda: _ckpt(1, numel=10_000))
        before = _snapshot(path)
        usage = shutil.disk_usage(path)
        monkeypatch.setattr(rundir_module.shutil, "disk_usage", lambda _p: usage._replace(free=20_000))
        with pytest.raises(DiskFullError) as excinfo:  # a checkpoint is some 40 kB
            rundir.end_epoch(_record(2), improved=True, checkpoint=lambda: _ckpt(2, numel=10_000))
        assert str(excinfo.value).startswith(f"disk full while writing {path / 'best.pt'} (about 4")
        assert "kB needed, 20.0 kB free)" in str(excinfo.value)
        assert str(excinfo.value).endswith("then resume with --resume (last.pt of epoch 1 is intact)")
        assert _snapshot(path) == before


_DISK_FULL = """
import json, os, resource, signal, sys
from pathlib import Path
import torch
import tinyswin.rundir
from tinyswin.checkpoint import FORMAT, load_checkpoint
from tinyswin.errors import DiskFullError
from tinyswin.rundir import RunDir

tinyswin.rundir.plot_run = lambda _path: None
path, limit = Path(sys.argv[1]), int(sys.argv[2])

def ckpt(epoch, numel):
    return {"format": FORMAT, "model": {"w": torch.full((numel,), float(epoch))}, "model_config": {},
            "class_names": ["a"], "epoch": epoch}

with RunDir(path, main=True, say=print) as rundir:
    rundir.open(resume=False)
    rundir.end_epoch({"epoch": 1, "loss": 1.0}, improved=True, checkpoint=lambda: ckpt(1, 1000))
    metrics = (path / "metrics.jsonl").read_text()
    if limit:  # else the disk (a small tmpfs) is what runs out
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    out = {}
    for improved in (False, True):
        try:
            rundir.end_epoch({"epoch": 2, "loss": 0.5}, improved, checkpoint=lambda: ckpt(2, 1_000_000))
        except DiskFullError as exc:
            out[f"error_{improved}"] = [type(exc).__name__, exc.errno, str(exc)]
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out["files"] = sorted(p.name for p in path.iterdir())
    out["last_epoch"] = load_checkpoint(path / "last.pt")["epoch"]
    out["last_ok"] = bool((load_checkpoint(path / "last.pt")["model"]["w"] == 1.0).all())
    out["best_epoch"] = load_checkpoint(path / "best.pt")["epoch"]
    out["metrics_unchanged"] = (path / "metrics.jsonl").read_text() == metrics
    rundir.end_epoch({"epoch": 2, "loss": 0.5}, False, checkpoint=lambda: ckpt(2, 1000))  # space again
    out["after"] = [load_checkpoint(path / "last.pt")["epoch"], len(metrics.splitlines()),
                    len((path / "metrics.jsonl").read_text().splitlines())]
print(json.dumps(out))
"""


def _check_disk_full(out: dict, path: Path, errno_name: str) -> None:
    last = f"disk full while writing {path / 'last.pt'} ("
    best = f"disk full while writing {path / 'best.pt'} ("
    advice = "): free some space, then resume with --resume (last.pt of epoch 1 is intact)"
    for key, start in (("error_False", last), ("error_True", best)):
        name, code, message = out[key]
        assert name == "DiskFullError" and code == getattr(errno, errno_name)
        assert message.startswith(start) and message.endswith(advice) and "\n" not in message, message
    assert out["files"] == [".lock", ".lock.pid", "best.pt", "last.pt", "metrics.jsonl"]  # no temporary file
    assert out["last_epoch"] == 1 and out["last_ok"] and out["best_epoch"] == 1
    assert out["metrics_unchanged"]  # no epoch 2 without its last.pt
    assert out["after"] == [2, 1, 2]


def test_a_file_size_limit_during_a_checkpoint_write_leaves_the_previous_last_pt(tmp_path: Path) -> None:
    path = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, str(path), str(256 * 1024)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    _check_disk_full(json.loads(result.stdout.splitlines()[-1]), path, "EFBIG")
    assert load_checkpoint(path / "last.pt")["epoch"] == 2
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # this process: untouched


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


def test_a_full_disk_during_a_checkpoint_write_leaves_the_previous_last_pt(tmp_path: Path) -> None:
    if not _can_mount_tmpfs():
        pytest.skip("mounting a small tmpfs needs root and unshare (the file size limit test covers this)")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    path = mount / "run"
    script = tmp_path / "disk_full.py"
    script.write_text(_DISK_FULL)
    command = f'mount -t tmpfs -o size=1m tmpfs "{mount}" && exec "{sys.executable}" "{script}" "{path}" 0'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    _check_disk_full(json.loads(result.stdout.splitlines()[-1]), path, "ENOSPC")
    assert list(mount.iterdir()) == []  # the tmpfs lived in its own mount namespace


_TRAIN_UNTIL_THE_DISK_FILLS = """
import resource, signal, sys
from tinyswin.config import load_config
from tinyswin.errors import DiskFullError
from tinyswin.train import train

def log(line):
    if line.startswith("epoch 2/"):  # from now on no file may grow past 16 kB: epoch 3's checkpoint fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))

try:
    train(load_config(None, None, sys.argv[2:]), sys.argv[1], progress=False, log=log)
except DiskFullError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_run_stopped_by_a_full_disk_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    overrides = tiny_run_overrides(make_tiny_cache(tmp_path / "data"), epochs=4)
    cfg = load_config(None, None, overrides)
    reference = tmp_path / "reference"
    train(cfg, reference, progress=False, log=lambda _m: None)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run(
        [sys.executable, "-c", _TRAIN_UNTIL_THE_DISK_FILLS, str(run_dir), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    message = stopped.stdout.splitlines()[-1]
    assert message.startswith(f"disk full while writing {run_dir}/")
    assert message.endswith(
        "(File too large): free some space, then resume with --resume (last.pt of epoch 2 is intact)"
    )
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]
    train(cfg, run_dir, resume=True, progress=False, log=lambda _m: None)
    a, b = load_checkpoint(reference / "last.pt"), load_checkpoint(run_dir / "last.pt")
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["ema"].items():
        assert torch.equal(tensor, b["ema"][name]), f"ema {name}"
    timing = {"seconds", "images_per_s", "train_seconds", "elapsed"}
    ra, rb = (read_metrics(d / "metrics.jsonl") for d in (reference, run_dir))
    assert [{k: v for k, v in r.items() if k not in timing} for r in ra] == [
        {k: v for k, v in r.items() if k not in timing} for r in rb
    ]
    assert load_checkpoint(reference / "best.pt")["epoch"] == load_checkpoint(run_dir / "best.pt")["epoch"]
