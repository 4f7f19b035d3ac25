"""What a model path on the command line is, and its files read: the one answer that `eval`, `predict`,
`export`, `report`, `eval --onnx` and `--init` take.

    kind         the path                                                      read by
    RUN          a run directory: its best.pt, else last.pt                    read_checkpoint, read_weights
    CHECKPOINT   any other file: a tinyswin checkpoint (.pt), or a state dict  read_checkpoint (a checkpoint),
                 (.pth, .bin: timm names, or an official Swin checkpoint's     read_weights (either)
                 {"model": ...})
    EXPORT       a `tinyswin export --format safetensors` folder, or its       read_checkpoint, read_weights
                 model.safetensors
    TIMM         a folder with model.safetensors in timm's names: `tinyswin    exported.load_timm_export
                 export --format timm`, or a model hub's                       (predict), read_weights
    SAFETENSORS  any other .safetensors file: a state dict                     read_weights
    ONNX         a .onnx file                                                  export.ort_session (predict,
                                                                               eval --onnx)
    FOLDER       a folder that is none of these                                (refused by each)

The kind is told from names alone (the suffix, the files a folder holds, the `library` of an export's
config.json); nothing is loaded until a reader opens the path.
"""

from __future__ import annotations

import enum
import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinyswin.checkpoint import check_checkpoint, load_checkpoint
from tinyswin.errors import TinyswinError, first_line, one_line
from tinyswin.exported import CONFIG_FILE, LIBRARY, WEIGHTS_FILE, checkpoint_from_exported, read_exported
from tinyswin.extras import require

RUN_CHECKPOINTS = ("best.pt", "last.pt")  # what a run directory holds, in the order they are read
# what wraps a state dict in the checkpoints of other code bases
_WRAPPERS = ("model", "state_dict", "model_state", "module")


class Kind(enum.Enum):
    """What a model path is (see the module's table)."""

    RUN = "a run directory"
    CHECKPOINT = "a checkpoint or state dict file"
    EXPORT = "a tinyswin export folder"
    TIMM = "a timm model folder"
    SAFETENSORS = "a safetensors weights file"
    ONNX = "an ONNX file"
    FOLDER = "a folder of none of these"


@dataclass(frozen=True)
class ModelPath:
    """A path identified.

    Attributes:
        given: the path as given (`~` expanded).
        kind: what it is.
        path: what is read: the checkpoint of a run, the folder of an export's model.safetensors, else
            `given`.
    """

    given: Path
    kind: Kind
    path: Path


def is_exported(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a tinyswin export folder (config.json naming tinyswin, and model.safetensors)."""
    path = Path(path)
    if not ((path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()):
        return False
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("library") == LIBRARY
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def identify(path: str | os.PathLike[str]) -> ModelPath:
    """What `path` is, told from names alone (a missing path is a file of the kind its suffix says)."""
    given = Path(path).expanduser()
    if given.is_dir():
        if is_exported(given):
            return ModelPath(given, Kind.EXPORT, given)
        checkpoint = next((given / n for n in RUN_CHECKPOINTS if (given / n).is_file()), None)
        if checkpoint is not None:
            return ModelPath(given, Kind.RUN, checkpoint)
        if (given / WEIGHTS_FILE).is_file():
            return ModelPath(given, Kind.TIMM, given)
        return ModelPath(given, Kind.FOLDER, given)
    if given.suffix == ".onnx":
        return ModelPath(given, Kind.ONNX, given)
    if given.suffix == ".safetensors":
        if given.name == WEIGHTS_FILE and is_exported(given.parent):
            return ModelPath(given, Kind.EXPORT, given.parent)
        return ModelPath(given, Kind.SAFETENSORS, given)
    return ModelPath(given, Kind.CHECKPOINT, given)


def read_checkpoint(path: str | os.PathLike[str] | ModelPath) -> tuple[ModelPath, dict[str, Any]]:
    """The checkpoint dict of a checkpoint file, a run directory or an export folder (an export in the form
    of a checkpoint: `exported.checkpoint_from_exported`).

    Raises:
        FileNotFoundError: no such file, or a folder that is neither a run nor an export.
        ValueError: the file is not a tinyswin checkpoint.
        TinyswinError: an export's files are not what an export writes.
    """
    found = path if isinstance(path, ModelPath) else identify(path)
    if found.kind is Kind.EXPORT:
        return found, checkpoint_from_exported(found.path)
    if found.kind in (Kind.TIMM, Kind.FOLDER):
        raise FileNotFoundError(
            f"{found.given} holds no best.pt or last.pt: give a run directory or a .pt file"
        )
    return found, load_checkpoint(found.path)


def read_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], bool]:
    """The weights an `init` path holds, under their own names, and the shift rule where the source says one
    (`shift_full_window` of a tinyswin checkpoint or export; False for the others).

    Raises:
        FileNotFoundError: no such path.
        TinyswinError: one line naming the path and what is wrong with it.
    """
    found = identify(path)
    if not found.given.exists():
        raise FileNotFoundError(f"init weights not found: {found.given}")
    if found.kind is Kind.EXPORT:
        state, info = read_exported(found.path)
        return dict(state), bool(info.model_config.get("shift_full_window", False))
    if found.kind is Kind.RUN:
        return _checkpoint_state(load_checkpoint(found.path))
    if found.kind is Kind.TIMM:
        return _read_safetensors(found.path / WEIGHTS_FILE), False
    if found.kind is Kind.SAFETENSORS:
        return _read_safetensors(found.path), False
    if found.kind is Kind.FOLDER:
        raise TinyswinError(f"init={found.given}: a folder without {WEIGHTS_FILE}, best.pt or last.pt")
    return _torch_file_state(found.path)


def _torch_file_state(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The weights of a file torch.load reads: a tinyswin checkpoint's, or a state dict (unwrapped)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip, older versions a pickle
        raise TinyswinError(f"init={path}: not a weights file torch.load can read (nor a .safetensors file)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TinyswinError(f"init={path}: refused: loading it would run code ({first_line(exc)})") from None
    except Exception as exc:  # torch.load raises many kinds on a file that is not a checkpoint
        raise TinyswinError(
            f"init={path}: not a weights file torch.load can read ({first_line(exc)})"
        ) from None
    if isinstance(data, dict) and "format" in data and "model_config" in data:
        return _checkpoint_state(check_checkpoint(data, path))
    return _unwrap(data, path), False


def _checkpoint_state(ckpt: dict[str, Any]) -> tuple[dict[str, torch.Tensor], bool]:
    """The weights of a tinyswin checkpoint and its shift rule."""
    return dict(ckpt["model"]), bool(ckpt["model_config"].get("shift_full_window", False))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    st = require("safetensors.torch", "export", "reading .safetensors weights")
    try:
        return dict(st.load_file(str(path), device="cpu"))
    except Exception as exc:  # safetensors raises its own kinds on a damaged file
        raise TinyswinError(f"init={path}: not a readable safetensors file ({one_line(exc)})") from None


def _unwrap(data: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: itself, or under "model", "state_dict", ...; "module." stripped."""
    for key in _WRAPPERS:
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if (
        not isinstance(data, Mapping)
        or not data
        or not all(isinstance(v, torch.Tensor) for v in data.values())
    ):
        raise TinyswinError(f"init={path}: holds no state dict (a mapping of names to tensors)")
    return {str(k).removeprefix("module."): v for k, v in data.items()}
