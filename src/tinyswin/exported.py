"""The exported model folder: `model.safetensors` (the weights) and `config.json` (what inference needs),
written by `tinyswin export --format safetensors` and read by `load_pretrained`, `predict` and `eval`.

`ModelInfo` is what inference needs besides the weights (model config, classes, normalisation, sizes); the
same fields travel in an ONNX file's metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tinyswin.checkpoint import FORMAT
from tinyswin.errors import TinyswinError, one_line
from tinyswin.extras import require
from tinyswin.model import SwinConfig, SwinTransformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LIBRARY = "tinyswin"
TIMM_INFO_KEY = "tinyswin"  # in a timm model folder's config.json: the ModelInfo of the model it came from


@dataclass(frozen=True)
class ModelInfo:
    """What inference needs besides the weights.

    Attributes:
        model_config: the SwinConfig as plain data (lists for tuples).
        class_names: label order: the readable names.
        class_ids: label order: the dataset's ids (e.g. WordNet ids).
        mean: per-channel normalisation mean, 0..1 scale.
        std: per-channel normalisation std, 0..1 scale.
        image_size: side of the images the model was trained on: image files are decoded to this size.
        input_size: (H, W) of the model's input: decoded images are resized to it when it differs.
        interpolation: the resize's filter ('bilinear' or 'bicubic').
        tinyswin_version: the version that wrote the export.
        train_config: the training run's config (plain data, its data source left out), or None.
    """

    model_config: dict[str, Any]
    class_names: list[str]
    class_ids: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    input_size: tuple[int, int]
    interpolation: str
    tinyswin_version: str
    train_config: dict[str, Any] | None = None

    def swin_config(self) -> SwinConfig:
        """The model's SwinConfig."""
        return SwinConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.model_config.items()})

    def to_json(self) -> dict[str, Any]:
        """Plain data for config.json (lists for tuples)."""
        out = asdict(self)
        out["mean"], out["std"], out["input_size"] = list(self.mean), list(self.std), list(self.input_size)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], origin: str) -> ModelInfo:
        """Read the fields back; a missing or malformed one is a one-line error naming `origin`.

        Raises:
            TinyswinError: a field is missing, or the model config is not a valid SwinConfig.
        """
        names = [f for f in cls.__dataclass_fields__ if f != "train_config"]
        missing = [name for name in names if name not in data]
        if missing:
            raise TinyswinError(f"{origin}: not a tinyswin export: missing {', '.join(missing)}")
        try:
            info = cls(
                model_config=dict(data["model_config"]),
                class_names=[str(c) for c in data["class_names"]],
                class_ids=[str(c) for c in data["class_ids"]],
                mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
                image_size=int(data["image_size"]),
                input_size=tuple(int(v) for v in data["input_size"]),  # type: ignore[arg-type]
                interpolation=str(data["interpolation"]),
                tinyswin_version=str(data["tinyswin_version"]),
                train_config=data.get("train_config"),
            )
            num_classes = info.swin_config().num_classes
        except (TypeError, ValueError) as exc:
            raise TinyswinError(f"{origin}: malformed tinyswin export: {exc}") from None
        if len(info.class_names) != num_classes or len(info.class_ids) != num_classes:
            raise TinyswinError(
                f"{origin}: {len(info.class_names)} class names for a model of {num_classes} classes"
            )
        return info


def read_info(path: str | os.PathLike[str]) -> ModelInfo:
    """The ModelInfo of an exported folder.

    Raises:
        FileNotFoundError: the folder lacks config.json.
        TinyswinError: config.json is not a tinyswin export's.
    """
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not an exported model folder (no {CONFIG_FILE})")
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TinyswinError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("library") != LIBRARY:
        raise TinyswinError(f"{file}: not a tinyswin model config (its 'library' is not {LIBRARY!r})")
    return ModelInfo.from_json(data, str(file))


def folder_config(info: ModelInfo) -> dict[str, Any]:
    """The contents of config.json: the ModelInfo fields, with hub-style keys for other tools."""
    return {
        "library": LIBRARY,
        "architecture": "swin_transformer",
        "num_classes": len(info.class_names),
        "label_names": info.class_ids,  # timm's keys for the label order
        "label_descriptions": dict(zip(info.class_ids, info.class_names, strict=True)),
        **info.to_json(),
    }


def load_timm_export(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, ModelInfo]:
    """The timm model of a folder written by `tinyswin export --format timm` (in eval mode, on the CPU) and
    the ModelInfo of the model it came from.

    Raises:
        MissingExtraError: timm or safetensors is not installed.
        TinyswinError: the folder's files are not what the export writes.
    """
    file = Path(path) / CONFIG_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TinyswinError(f"{file}: not readable JSON ({one_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get(TIMM_INFO_KEY), dict):
        raise TinyswinError(
            f"{file}: holds no {TIMM_INFO_KEY!r} model info (classes, normalisation): a timm folder that "
            "`tinyswin export --format timm` did not write"
        )
    info = ModelInfo.from_json(data[TIMM_INFO_KEY], str(file))
    timm = require("timm", "timm", "a timm model folder")
    safetensors_torch = require("safetensors.torch", "export", "reading a safetensors model")
    try:
        model = timm.create_model(data["architecture"], pretrained=False, **data["model_args"])
        model.load_state_dict(safetensors_torch.load_file(str(Path(path) / WEIGHTS_FILE)))
    except Exception as exc:  # timm and safetensors raise many kinds on a config or file they cannot use
        reason = one_line(exc)[:300]
        raise TinyswinError(f"{path}: timm cannot build this model folder ({reason})") from None
    return model.eval(), info


def read_exported(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], ModelInfo]:
    """The weights and the ModelInfo of an exported folder.

    Raises:
        FileNotFoundError: a file of the folder is missing.
        TinyswinError: a file is not what an export writes.
    """
    info = read_info(path)
    safetensors_torch = require("safetensors.torch", "export", "reading a safetensors model")
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not an exported model folder (no {WEIGHTS_FILE})")
    try:
        state = safetensors_torch.load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types on a damaged file
        raise TinyswinError(f"{file}: not a readable safetensors file ({exc})") from None
    return state, info


def checkpoint_from_exported(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An exported folder in the form of a checkpoint dict (the keys `LoadedModel` reads; no EMA: the
    export holds the weights it was made with). The training config keeps no data source: give one."""
    state, info = read_exported(path)
    return {
        "format": FORMAT,
        "model": state,
        "ema": None,
        "model_config": info.model_config,
        "train_config": info.train_config or {},
        "class_names": info.class_names,
        "class_ids": info.class_ids,
        "image_size": info.image_size,
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
    }


def load_pretrained(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SwinTransformer:
    """A model exported with `tinyswin export --format safetensors`, in eval mode.

    The model's `ModelInfo` (classes, normalisation, sizes) is `read_info(path)`.

    Args:
        path: the exported folder (config.json and model.safetensors).
        device: where to put the model.

    Returns:
        The SwinTransformer with the exported weights.

    Raises:
        FileNotFoundError: not an exported folder.
        TinyswinError: the files are not what an export writes, or the weights do not fit the config.
    """
    state, info = read_exported(path)
    model = SwinTransformer(info.swin_config())
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        reason = one_line(exc)[:300]
        raise TinyswinError(f"{path}: the weights do not fit its config.json ({reason})") from None
    return model.to(device).eval()
