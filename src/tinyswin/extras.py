"""Optional dependencies, imported when a command needs them; a missing one is a one-line error naming the
extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from tinyswin.errors import TinyswinError

# extra -> the modules it provides (pyproject.toml's [project.optional-dependencies])
EXTRAS = {
    "export": ("onnx", "onnxruntime", "onnxscript", "safetensors"),
    "timm": ("timm",),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "tune": ("optuna",),
}


class MissingExtraError(TinyswinError, ImportError):
    """An optional dependency is not installed; the message names the extra and the pip command."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise a one-line MissingExtraError.

    Args:
        module: the module to import, e.g. "onnxruntime" or "safetensors.torch".
        extra: the tinyswin extra that installs it, e.g. "export".
        purpose: what it is needed for, e.g. "ONNX export".

    Raises:
        MissingExtraError: the module (or a package it needs) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        raise MissingExtraError(
            f"{purpose} needs {missing}, which is not installed: pip install 'tinyswin[{extra}]'"
        ) from None
