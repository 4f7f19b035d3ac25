"""Checkpoints: atomic writes, safe reads (`weights_only=True`) and compatibility checks.

A checkpoint is one dict of plain data (tensors, dicts, lists, strings, numbers):
`{format, model, optimizer, scheduler, scaler, ema, epoch, step, best, model_config, train_config,
class_names, class_ids, rng_state, ...}`, the model's weights taken from the unwrapped, uncompiled module.
Reading it cannot run code: `torch.load(weights_only=True)` refuses any pickle that would.
"""

from __future__ import annotations

import os
import pickle
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from tinyswin.errors import (
    DISK_FULL_ERRNOS,
    disk_full_cause,
    disk_full_error,
    disk_full_reason,
    first_line,
)

FORMAT = 1  # the layout below; a checkpoint of another format is refused on load
REQUIRED_KEYS = ("format", "model", "model_config", "class_names")
# what a training run writes, besides the format
CONTENTS = (
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "ema",
    "epoch",
    "step",
    "best",
    "model_config",
    "train_config",
    "class_names",
    "class_ids",
    "normalization",
    "image_size",
    "rng_state",
    "loop",
)
# what only --resume needs: best.pt goes without them
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng_state")
# Testing hook: seconds to sleep after the temporary file is written and before it is renamed into place, so
# that a test can kill a process in the middle of a checkpoint write.
WRITE_DELAY_ENV = "TINYSWIN_CHECKPOINT_WRITE_DELAY"
TEMP_MARKER = ".tmp-"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def make_checkpoint(**parts: Any) -> dict[str, Any]:
    """A checkpoint of format `FORMAT`: exactly the `CONTENTS` keys, plus the format.

    Raises:
        ValueError: a key is missing or unknown.
    """
    missing, extra = sorted(set(CONTENTS) - set(parts)), sorted(set(parts) - set(CONTENTS))
    if missing or extra:
        raise ValueError(f"checkpoint format {FORMAT}: missing keys {missing}, unknown keys {extra}")
    return {"format": FORMAT, **parts}


def inference_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """`ckpt` without what only resuming needs (`RESUME_ONLY`: optimizer, scheduler, scaler and random
    states): the weights, EMA, configs, class names and the loop's metrics, all that eval and predict read."""
    return {key: value for key, value in ckpt.items() if key not in RESUME_ONLY}


def is_resumable(ckpt: Mapping[str, Any]) -> bool:
    """Whether `ckpt` holds what `--resume` needs (a last.pt does; a best.pt does not)."""
    return all(key in ckpt for key in RESUME_ONLY)


def clone_tree(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are cloned (on their devices): a snapshot that later
    training steps do not change."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {key: clone_tree(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(value) for value in obj)
    return obj


class _RecordingWriter:
    """A binary file whose failed writes are remembered: `torch.save` reports them as a bare RuntimeError."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], Any]) -> Path:
    """Write a file atomically: `write(f)` into a temporary file beside `path`, fsync, rename, fsync of the
    folder. A reader (or a process killed mid-write) sees either the old file or the new one, never half a
    file; on any failure the temporary file is removed and the old file stays as it was.

    Args:
        path: the file to write.
        write: writes the contents to the binary file-like object it is given (`write` and `flush`).

    Returns:
        `path`.

    Raises:
        DiskFullError: the disk (or quota, or file size limit) ran out: one line naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")
    writer: _RecordingWriter | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else disk_full_cause(exc)
        if isinstance(exc, Exception) and cause is not None and cause.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(
                f"disk full while writing {path} ({disk_full_reason(cause)})", cause
            ) from cause
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file, fsync, rename): readers see the old or the new file.

    Raises:
        DiskFullError: the disk ran out; `path` is as it was and no temporary file is left.
    """
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """`torch.save(obj)` to `path` through `atomic_write`: the old file or the new one, never half a file.

    Raises:
        DiskFullError: the disk ran out; the temporary file is gone and the previous `path` is intact.
    """

    def write(f: Any) -> None:
        torch.save(obj, f)
        delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
        if delay > 0:
            f.flush()
            time.sleep(delay)

    return atomic_write(path, write)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_temp_name(name: str) -> bool:
    """Whether `name` is the temporary file of an atomic write: `.NAME.tmp-PID`."""
    return name.startswith(".") and TEMP_MARKER in name


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files left in `folder` by writes that were killed; returns what was removed.

    Only call it while no other process writes there (a run directory's lock held).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if is_temp_name(p.name) and not p.is_dir():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `torch.load(weights_only=True)`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a tinyswin checkpoint, or it is a pickle that would run code on loading.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused: not a plain-data checkpoint (loading it would run code or build objects "
            f"outside weights_only): {first_line(exc)}"
        ) from None
    except Exception as exc:  # torch.load raises many kinds on a file that is not a checkpoint
        size = path.stat().st_size
        what = "an empty file" if size == 0 else f"a file of {size} bytes that torch.load cannot read"
        raise ValueError(f"{path}: not a tinyswin checkpoint ({what}: {first_line(exc)})") from None
    return check_checkpoint(ckpt, path)


def check_checkpoint(ckpt: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """`ckpt` (what torch.load gave for `path`), checked to be a tinyswin checkpoint of this format.

    Raises:
        ValueError: it lacks a checkpoint's keys, or has another format.
    """
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a tinyswin checkpoint (expected keys {REQUIRED_KEYS}, found {have})")
    if ckpt["format"] != FORMAT:
        raise ValueError(
            f"{path}: checkpoint format {ckpt['format']!r} is not one this version of tinyswin reads "
            f"(format {FORMAT}); evaluate it with the tinyswin that wrote it"
        )
    return ckpt


def differences(theirs: Any, ours: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two plain values: ['key: A (checkpoint) != B (this run)', ...]."""
    if isinstance(theirs, Mapping) and isinstance(ours, Mapping):
        out = []
        for key in sorted(set(theirs) | set(ours), key=str):
            name = f"{prefix}{key}"
            if key not in theirs:
                out.append(f"{name}: missing in the checkpoint, {ours[key]!r} in this run")
            elif key not in ours:
                out.append(f"{name}: {theirs[key]!r} in the checkpoint, missing in this run")
            else:
                out += differences(theirs[key], ours[key], name + ".")
        return out
    a = list(theirs) if isinstance(theirs, tuple) else theirs
    b = list(ours) if isinstance(ours, tuple) else ours
    if a != b:
        return [f"{prefix.rstrip('.') or 'value'}: {a!r} (checkpoint) != {b!r} (this run)"]
    return []


def check_compatible(
    ckpt: Mapping[str, Any],
    *,
    model_config: Mapping[str, Any] | None = None,
    class_names: list[str] | None = None,
    source: str = "checkpoint",
) -> None:
    """Refuse a checkpoint whose model config or class list differs from this run's, saying what differs.

    Raises:
        ValueError: one line naming `source` and each difference (the first few).
    """
    problems: list[str] = []
    if model_config is not None:
        problems += [f"model config {d}" for d in differences(ckpt["model_config"], model_config)]
    if class_names is not None and list(ckpt["class_names"]) != list(class_names):
        theirs, ours = list(ckpt["class_names"]), list(class_names)
        if len(theirs) != len(ours):
            problems.append(f"class list: {len(theirs)} classes (checkpoint) != {len(ours)} (this run)")
        else:
            i = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
            problems.append(f"class list: class {i} is {theirs[i]!r} (checkpoint) != {ours[i]!r} (this run)")
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ValueError(f"{source} does not match: " + "; ".join(problems[:4]) + more)


def rng_state() -> dict[str, Any]:
    """The global random states (torch, CUDA, Python, numpy) as plain data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("python"):
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy"):
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
