"""The model presets: named `SwinConfig`s, a small factory function each (as timm registers its variants and
torchvision has `swin_t()`), and `preset_config(name, **overrides)`, which the training config's
`model.preset` names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from types import MappingProxyType

from tinyswin.model import SwinConfig


def swin_t() -> SwinConfig:
    """Official Swin-T at 224px: C 96, depths 2-2-6-2, heads 3-6-12-24, window 7, drop path 0.2."""
    return SwinConfig()


def seed() -> SwinConfig:
    """The notebook's model, quirks included: 64px, patch 4, C 96, depths 2-2-6-2, heads 2-4-8-16, windows
    8-8-4-2, drop path 0.2, no patch norm, zero-initialised tables, a shift in every second block even where
    the window covers the map."""
    return SwinConfig(
        img_size=64,
        patch_size=4,
        num_classes=200,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 8, 16),
        window_size=(8, 8, 4, 2),
        mlp_ratio=4.0,
        drop_path_rate=0.2,
        patch_norm=False,
        shift_full_window=True,
        rpb_init_std=0.0,
    )


def tiny64() -> SwinConfig:
    """The seed geometry under the official rules: patch norm, a shift only where the window is smaller than
    the map, tables initialised with std 0.02."""
    return replace(seed(), patch_norm=True, shift_full_window=False, rpb_init_std=0.02)


def small64() -> SwinConfig:
    """A three-stage Swin for 64px inputs with the geometry of the small Swin of Lee et al. 2021: patch 2
    (32x32 tokens), C 96, depths 2-6-4, heads 3-6-12, window 4, drop path 0.1."""
    return SwinConfig(
        img_size=64,
        patch_size=2,
        num_classes=200,
        depths=(2, 6, 4),
        num_heads=(3, 6, 12),
        window_size=4,
        drop_path_rate=0.1,
    )


def nano() -> SwinConfig:
    """The recipes' small Swin, for two CPU cores and small images: C 48, depths 2-2-2, heads 2-4-8, window
    4, 10 classes, drop path 0.05 (1.27M parameters)."""
    return SwinConfig(
        img_size=64,
        num_classes=10,
        embed_dim=48,
        depths=(2, 2, 2),
        num_heads=(2, 4, 8),
        window_size=4,
        drop_path_rate=0.05,
    )


_PRESETS: Mapping[str, Callable[[], SwinConfig]] = MappingProxyType(
    {"swin_t": swin_t, "seed": seed, "tiny64": tiny64, "small64": small64, "nano": nano}
)


def preset_names() -> list[str]:
    """Names of the model presets."""
    return list(_PRESETS)


def preset_config(name: str, **overrides: object) -> SwinConfig:
    """The config of a named preset, with fields replaced by `overrides`.

    Args:
        name: One of `preset_names()`.
        **overrides: SwinConfig fields to change, e.g. num_classes=10.

    Returns:
        The validated config.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(_PRESETS)}")
    known = {f.name for f in fields(SwinConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown SwinConfig field(s) {', '.join(unknown)} for preset {name!r}")
    return replace(_PRESETS[name](), **overrides)
