"""The augmentation recipe: ``AugmentConfig`` (every field of the pipeline, validated) and named presets.

``augment_preset(name, **overrides)`` returns a preset with fields replaced; ``augment_preset_names()``
lists the presets. ``tinyswin.data.augment`` builds the pipeline from a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tinyswin.errors import AugmentConfigError

__all__ = ["AugmentConfig", "AugmentConfigError", "augment_preset", "augment_preset_names"]

_CROPS = ("rrc", "pad", "none")
_INTERPOLATIONS = ("bilinear", "bicubic")
_RA_INTERPOLATIONS = ("nearest", "bilinear")
_MIX_SELECT = ("sequential", "exclusive")


@dataclass(frozen=True)
class AugmentConfig:
    """The whole training augmentation pipeline. The defaults do nothing but normalize.

    Attributes:
        out_size: training resolution (square); None keeps the stored image size.
        crop: 'rrc' (RandomResizedCrop), 'pad' (RandomCrop with zero padding) or 'none'.
        crop_scale: RandomResizedCrop area range, as a fraction of the image.
        crop_ratio: RandomResizedCrop aspect ratio range (width / height).
        crop_padding: zero padding of the 'pad' crop, in pixels.
        interpolation: 'bilinear' or 'bicubic' for crops and resizes (antialiased where they shrink).
        hflip: probability of a horizontal flip.
        randaug_ops: RandAugment ops per sample (0 = off).
        randaug_magnitude: RandAugment magnitude bin.
        randaug_bins: number of magnitude bins (torchvision: 31).
        randaug_magnitude_std: std of the magnitude bin per op (0 = fixed; inf = uniform in [0, magnitude]).
        randaug_interpolation: 'nearest' (torchvision's default) or 'bilinear' for the geometric ops.
        jitter_brightness, jitter_contrast, jitter_saturation: ColorJitter strengths (0 = off).
        jitter_hue: ColorJitter hue strength in [0, 0.5] (0 = off).
        erase_p: RandomErasing probability.
        erase_scale: erased area range, as a fraction of the image.
        erase_ratio: erased box aspect ratio range.
        erase_value: 'random' (per-pixel standard normal noise), a number, or one number per channel (in
            normalized units, as torchvision's RandomErasing after Normalize).
        mixup_p, mixup_alpha: Mixup probability and Beta(alpha, alpha) parameter.
        cutmix_p, cutmix_alpha: CutMix probability and Beta(alpha, alpha) parameter.
        mix_per_sample: draw mode, lambda and box per sample instead of once per batch.
        mix_select: 'sequential' (Mixup with mixup_p, else CutMix with cutmix_p) or 'exclusive' (one draw:
            Mixup with mixup_p, CutMix with cutmix_p).
        mix_lambda_clip: bounds of lambda (before the CutMix box correction).
        mix_label_smoothing: label smoothing folded into the soft targets of mixed batches.
        device_params: draw the parameters on the batch's device and apply them without a host sync
            (``augment_device``; for GPU runs): other random draws than the default, which draws everything
            on the CPU so that CPU and GPU batches agree.
    """

    out_size: int | None = None
    crop: str = "none"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    crop_padding: int = 4
    interpolation: str = "bilinear"
    hflip: float = 0.0
    randaug_ops: int = 0
    randaug_magnitude: float = 9.0
    randaug_bins: int = 31
    randaug_magnitude_std: float = 0.0
    randaug_interpolation: str = "nearest"
    jitter_brightness: float = 0.0
    jitter_contrast: float = 0.0
    jitter_saturation: float = 0.0
    jitter_hue: float = 0.0
    erase_p: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    erase_value: str | float | tuple[float, float, float] = "random"
    mixup_p: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_p: float = 0.0
    cutmix_alpha: float = 0.0
    mix_per_sample: bool = False
    mix_select: str = "sequential"
    mix_lambda_clip: tuple[float, float] = (0.001, 0.999)
    mix_label_smoothing: float = 0.0
    device_params: bool = False

    def __post_init__(self) -> None:
        def fail(key: str, reason: str) -> None:
            raise AugmentConfigError(key, getattr(self, key), reason)

        for key in ("crop_scale", "crop_ratio", "erase_scale", "erase_ratio", "mix_lambda_clip"):
            value = getattr(self, key)
            if not isinstance(value, (tuple, list)) or len(value) != 2 or not value[0] <= value[1]:
                fail(key, f"must be a (low, high) pair with low <= high, got {value!r}")
            object.__setattr__(self, key, (float(value[0]), float(value[1])))
        if isinstance(self.erase_value, list):
            object.__setattr__(self, "erase_value", tuple(float(v) for v in self.erase_value))
        for key, allowed in (
            ("crop", _CROPS),
            ("interpolation", _INTERPOLATIONS),
            ("randaug_interpolation", _RA_INTERPOLATIONS),
            ("mix_select", _MIX_SELECT),
        ):
            if getattr(self, key) not in allowed:
                fail(key, f"must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("hflip", "erase_p", "mixup_p", "cutmix_p", "mix_label_smoothing"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                fail(key, f"must be in [0, 1], got {getattr(self, key)!r}")
        for key in (
            "jitter_brightness",
            "jitter_contrast",
            "jitter_saturation",
            "mixup_alpha",
            "cutmix_alpha",
            "randaug_magnitude_std",
            "crop_padding",
            "randaug_ops",
        ):
            if getattr(self, key) < 0:
                fail(key, f"must be >= 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.jitter_hue <= 0.5:
            fail("jitter_hue", f"must be in [0, 0.5], got {self.jitter_hue!r}")
        if self.out_size is not None and self.out_size < 1:
            fail("out_size", f"must be a positive int or None, got {self.out_size!r}")
        if self.randaug_bins < 2 or not 0 <= self.randaug_magnitude <= self.randaug_bins - 1:
            fail(
                "randaug_magnitude",
                f"must be in [0, randaug_bins - 1], got {self.randaug_magnitude!r} with "
                f"randaug_bins={self.randaug_bins!r}",
            )
        for key in ("crop_scale", "crop_ratio", "erase_ratio"):
            if getattr(self, key)[0] <= 0:
                fail(key, f"must have a low end > 0, got {getattr(self, key)!r}")
        if self.erase_scale[0] < 0:
            fail("erase_scale", f"must have a low end >= 0, got {self.erase_scale!r}")
        if self.mixup_p > 0 and self.mixup_alpha <= 0:
            fail("mixup_p", f"needs mixup_alpha > 0, got {self.mixup_alpha}")
        if self.cutmix_p > 0 and self.cutmix_alpha <= 0:
            fail("cutmix_p", f"needs cutmix_alpha > 0, got {self.cutmix_alpha}")
        if isinstance(self.erase_value, str) and self.erase_value != "random":
            fail("erase_value", f"must be 'random' or numbers, got {self.erase_value!r}")


def _presets() -> dict[str, AugmentConfig]:
    """The named recipes (built on each call: no shared mutable state)."""
    seed = AugmentConfig(
        out_size=64,
        crop="rrc",
        crop_scale=(0.9, 1.0),
        crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
        interpolation="bilinear",
        hflip=0.5,
        randaug_ops=2,
        randaug_magnitude=5,
        randaug_bins=31,
        jitter_brightness=0.2,
        jitter_contrast=0.2,
        jitter_saturation=0.2,
        jitter_hue=0.05,
        erase_p=0.1,
        erase_scale=(0.02, 0.2),
        erase_ratio=(0.3, 3.3),
        erase_value="random",
        mixup_p=0.3,
        mixup_alpha=0.4,
        cutmix_p=0.3,
        cutmix_alpha=0.8,
        mix_select="sequential",
        mix_lambda_clip=(0.001, 0.999),
        mix_label_smoothing=0.0,
    )
    light = AugmentConfig(
        crop="rrc",
        crop_scale=(0.35, 1.0),
        hflip=0.5,
        randaug_ops=2,
        randaug_magnitude=7,
        mixup_p=0.15,
        mixup_alpha=0.4,
        cutmix_p=0.15,
        cutmix_alpha=0.8,
    )
    return {"seed": seed, "none": AugmentConfig(), "light": light}


def augment_preset_names() -> list[str]:
    """Names accepted by ``augment_preset``."""
    return list(_presets())


def _config_keys() -> list[str]:
    """The field names of ``AugmentConfig``."""
    return [f.name for f in dataclasses.fields(AugmentConfig)]


def augment_preset(name: str, **overrides: Any) -> AugmentConfig:
    """A named recipe, with any fields overridden.

    Presets: 'seed' (the notebook's pipeline, value by value), 'none' (normalize only), 'light' (a milder
    recipe for 64px images: RandomResizedCrop scale (0.35, 1), flip, RandAugment(2, 7), no colour jitter
    or erasing, Mixup / CutMix at 0.15 each).

    Args:
        name: preset name.
        **overrides: AugmentConfig fields.

    Returns:
        AugmentConfig.
    """
    presets = _presets()
    if name not in presets:
        raise ValueError(f"unknown augment preset {name!r}; choose from {sorted(presets)}")
    unknown = sorted(set(overrides) - set(_config_keys()))
    if unknown:
        raise ValueError(f"unknown augment config key(s) {unknown}; known keys: {_config_keys()}")
    return dataclasses.replace(presets[name], **overrides)
