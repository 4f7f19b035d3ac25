"""tinyswin: train a Swin Transformer from scratch on small images.

The names below load their module on first use, so that `import tinyswin.data` (say) does not load the model.
"""

from importlib import import_module
from typing import Any

from tinyswin.version import __version__

_EXPORTS = {
    "SwinConfig": "tinyswin.model",
    "SwinTransformer": "tinyswin.model",
    "preset_config": "tinyswin.model_presets",
    "preset_names": "tinyswin.model_presets",
    "from_timm": "tinyswin.interop",
    "to_timm": "tinyswin.interop",
    "load_pretrained": "tinyswin.exported",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinyswin' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
