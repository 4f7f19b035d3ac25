"""Checkpoints: atomic writes that survive a kill, reads that cannot run code, refusal of a mismatch."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinyswin.checkpoint import (
    FORMAT,
    WRITE_DELAY_ENV,
    atomic_save,
    check_compatible,
    differences,
    load_checkpoint,
    remove_stale_temps,
    unwrap,
)


def _ckpt(value: float, **extra) -> dict:
    return {
        "format": FORMAT,
        "model": {"w": torch.full((3,), value)},
        "model_config": {"embed_dim": 8, "depths": [1, 1]},
        "class_names": ["a", "b"],
        **extra,
    }


def test_round_trip_and_no_temp_left(tmp_path: Path) -> None:
    path = atomic_save(_ckpt(1.5, epoch=3, nested={"x": [1, 2.0, "s", None, (4, 5)]}), tmp_path / "last.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 1.5))
    assert loaded["epoch"] == 3 and loaded["nested"] == {"x": [1, 2.0, "s", None, (4, 5)]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


class _RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({**_ckpt(0.0), "payload": _RunsCode(marker)}, evil)
    with pytest.raises(ValueError, match=r"evil\.pt: refused"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the plain pickle module would have run it: the payload is real
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))
    pickle.loads(raw.read_bytes())
    assert marker.exists()


def test_a_checkpoint_of_another_format_is_refused(tmp_path: Path) -> None:
    path = atomic_save(_ckpt(1.0, format=FORMAT + 1), tmp_path / "future.pt")
    with pytest.raises(
        ValueError, match=rf"future\.pt: checkpoint format {FORMAT + 1} .* \(format {FORMAT}\)"
    ):
        load_checkpoint(path)
    atomic_save({k: v for k, v in _ckpt(1.0).items() if k != "format"}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt: not a tinyswin checkpoint"):
        load_checkpoint(tmp_path / "old.pt")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a tinyswin checkpoint"):
        load_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_mismatch_is_refused_saying_what_differs() -> None:
    ckpt = _ckpt(0.0)
    check_compatible(ckpt, model_config={"embed_dim": 8, "depths": (1, 1)}, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"model config embed_dim: 8 \(checkpoint\) != 16 \(this run\)"):
        check_compatible(ckpt, model_config={"embed_dim": 16, "depths": [1, 1]})
    with pytest.raises(ValueError, match=r"depths: \[1, 1\] \(checkpoint\) != \[1, 2\]"):
        check_compatible(ckpt, model_config={"embed_dim": 8, "depths": [1, 2]})
    with pytest.raises(ValueError, match=r"class 1 is 'b' \(checkpoint\) != 'c' \(this run\)"):
        check_compatible(ckpt, class_names=["a", "c"])
    with pytest.raises(ValueError, match=r"2 classes \(checkpoint\) != 3"):
        check_compatible(ckpt, class_names=["a", "b", "c"])
    assert differences({"a": 1, "b": 2}, {"a": 1, "c": 2}) == [
        "b: 2 in the checkpoint, missing in this run",
        "c: missing in the checkpoint, 2 in this run",
    ]


class _Compiled(torch.nn.Module):
    """Holds its module as `_orig_mod`, as torch.compile's OptimizedModule does."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = module


def test_unwrap_finds_the_module_inside_compile() -> None:
    inner = torch.nn.Linear(2, 2)
    wrapped = _Compiled(inner)
    assert list(wrapped.state_dict()) == ["_orig_mod.weight", "_orig_mod.bias"]
    assert unwrap(wrapped) is inner
    assert unwrap(inner) is inner
    assert list(unwrap(wrapped).state_dict()) == ["weight", "bias"]


_WRITER = """
import sys, torch
from tinyswin.checkpoint import atomic_save
atomic_save({"model": {"w": torch.full((1000,), 2.0)}, "model_config": {}, "class_names": []}, sys.argv[1])
"""


def test_a_write_killed_midway_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    atomic_save(_ckpt(1.0), path)
    env = {**os.environ, WRITE_DELAY_ENV: "30"}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".last.pt.tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline, (
                "the writer never started its temp file"
            )
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    loaded = load_checkpoint(path)  # the old file, whole
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 1.0))
    removed = remove_stale_temps(tmp_path)
    assert len(removed) == 1 and removed[0].name.startswith(".last.pt.tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
