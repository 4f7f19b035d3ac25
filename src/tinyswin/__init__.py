"""tinyswin: train a Swin Transformer from scratch on small images."""

from tinyswin.interop import from_timm
from tinyswin.model import SwinConfig, SwinTransformer, preset_config, preset_names

__version__ = "0.1.0"

__all__ = [
    "SwinConfig",
    "SwinTransformer",
    "__version__",
    "from_timm",
    "preset_config",
    "preset_names",
]
