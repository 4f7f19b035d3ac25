"""Per-sample random augmentation of whole uint8 batches, on whatever device the batch is on.

``build_augment(preset_or_config, mean, std, num_classes)`` returns an ``Augment``; calling it on a uint8
batch ``(B, H, W, 3)`` (or ``(B, 3, H, W)``), its int64 labels and a CPU ``torch.Generator`` returns the
normalized float batch ``(B, 3, H', W')`` and the targets. Every sample gets its own random parameters.
All of them are drawn on the CPU with the given generator (``Augment.sample``) and only then moved to the
batch's device (``Augment.apply``), so a CPU batch and a CUDA batch with the same seed get the same draws.

The pipeline, in the notebook's order:

1. crop: ``RandomResizedCrop`` (``crop='rrc'``), ``RandomCrop`` with zero padding (``crop='pad'``) or none
   (``crop='none'``, a plain resize when ``out_size`` differs from the stored size); horizontal flip.
2. ``RandAugment`` (torchvision's 14 ops and magnitude bins, per-sample ops and signs, optional magnitude
   std).
3. ``ColorJitter`` (brightness, contrast, saturation, hue; per-sample order of the four).
4. to float in [0, 1] and ``Normalize(mean, std)``.
5. ``RandomErasing`` (per-pixel normal noise or a constant).
6. Mixup / CutMix with soft targets (per batch, as the notebook, or per sample).

Steps 1-3 keep the batch as float32 whole numbers in [0, 255] and reproduce torchvision's uint8 tensor
ops (``torchvision.transforms.functional``, the v1 API): same float32 arithmetic, same rounding and
truncation back to uint8, same parameter distributions. With the parameters pinned, every colour and
pixel op, every nearest-neighbour RandAugment warp (torchvision's default) and every bilinear crop that
does not shrink (the 64px recipes) gives torchvision's result bit for bit; shrinking (antialiased) or
bicubic crops and bilinear RandAugment warps can differ by one level where a value sits on a .5 rounding
tie. The crop and RandAugment warps are separate resamplings, as in torchvision (composing them into one
warp would change the fill and skip the intermediate rounding). Differences from the notebook, which ran
the same transforms on PIL images: PIL's filters round differently from torchvision's tensor ops (a level
on some pixels), and the random streams differ.

Mixing follows the notebook's per-batch rule by default: Mixup with probability ``mixup_p``, otherwise
CutMix with probability ``cutmix_p`` (``mix_select='sequential'``; 'exclusive' makes the two
probabilities absolute). Lambda ~ Beta(alpha, alpha), clipped to ``mix_lambda_clip``; the CutMix box is
clipped to the image and lambda recomputed from its area; soft targets are ``lam * y + (1 - lam) *
y[partner]`` (with ``mix_label_smoothing`` folded into both one-hot vectors).

Speed: parameters are drawn for the whole batch at once. On a GPU (and on a CPU with ``native=False``)
nothing loops over samples in Python: every op runs on all the samples that drew it (gathered with
``index_select``, written back with ``index_copy_``), masks are 0/1 float arithmetic, histograms one
``bincount``/``scatter_add_``. On a CPU that costs one PyTorch op per arithmetic step over batches larger
than the cache, so there the crop, RandAugment, ColorJitter and Normalize run in the compiled kernels of
``augment_native`` (C, built on first use; the same results bit for bit), one sample at a time while it is in
cache, and per-batch Mixup/CutMix in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tinyswin.data import augment_native
from tinyswin.data.augment_geometry import (
    CropBoxes,
    crop_source_coords,
    pad_crop,
    resize,
    resized_crop,
    sample_pad_crop,
    sample_resized_crop,
    upsamples_exactly,
)
from tinyswin.data.augment_mix import EraseParams, MixParams, erase_, mix_, sample_erasing, sample_mix
from tinyswin.data.augment_native import NativeKernels
from tinyswin.data.augment_policy import (
    ColorJitterParams,
    RandAugmentParams,
    color_jitter_,
    randaugment_,
    randaugment_warps,
    sample_color_jitter,
    sample_randaugment,
)

__all__ = [
    "Augment",
    "AugmentConfig",
    "AugmentParams",
    "augment_preset",
    "augment_preset_names",
    "build_augment",
]

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

    def __post_init__(self) -> None:
        for key in ("crop_scale", "crop_ratio", "erase_scale", "erase_ratio", "mix_lambda_clip"):
            value = getattr(self, key)
            if not isinstance(value, (tuple, list)) or len(value) != 2 or not value[0] <= value[1]:
                raise ValueError(
                    f"augment config: {key} must be a (low, high) pair with low <= high, got {value!r}"
                )
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
                raise ValueError(
                    f"augment config: {key} must be one of {allowed}, got {getattr(self, key)!r}"
                )
        for key in ("hflip", "erase_p", "mixup_p", "cutmix_p", "mix_label_smoothing"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"augment config: {key} must be in [0, 1], got {getattr(self, key)!r}")
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
                raise ValueError(f"augment config: {key} must be >= 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.jitter_hue <= 0.5:
            raise ValueError(f"augment config: jitter_hue must be in [0, 0.5], got {self.jitter_hue!r}")
        if self.out_size is not None and self.out_size < 1:
            raise ValueError(
                f"augment config: out_size must be a positive int or None, got {self.out_size!r}"
            )
        if self.randaug_bins < 2 or not 0 <= self.randaug_magnitude <= self.randaug_bins - 1:
            raise ValueError(
                f"augment config: randaug_magnitude must be in [0, randaug_bins - 1], got "
                f"{self.randaug_magnitude!r} with randaug_bins={self.randaug_bins!r}"
            )
        if (
            self.crop_scale[0] <= 0
            or self.crop_ratio[0] <= 0
            or self.erase_scale[0] < 0
            or self.erase_ratio[0] <= 0
        ):
            raise ValueError(
                "augment config: crop_scale, crop_ratio and erase_ratio must be > 0, erase_scale >= 0"
            )
        if self.mixup_p > 0 and self.mixup_alpha <= 0:
            raise ValueError(
                f"augment config: mixup_p={self.mixup_p} needs mixup_alpha > 0, got {self.mixup_alpha}"
            )
        if self.cutmix_p > 0 and self.cutmix_alpha <= 0:
            raise ValueError(
                f"augment config: cutmix_p={self.cutmix_p} needs cutmix_alpha > 0, got {self.cutmix_alpha}"
            )
        if isinstance(self.erase_value, str) and self.erase_value != "random":
            raise ValueError(
                f"augment config: erase_value must be 'random' or numbers, got {self.erase_value!r}"
            )


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


@dataclass
class AugmentParams:
    """Every random draw for one batch (CPU tensors; None where a stage is off)."""

    crop: CropBoxes | None
    flip: Tensor
    randaug: RandAugmentParams | None
    jitter: ColorJitterParams | None
    erase: EraseParams | None
    mix: MixParams | None


def _channels_first(images: Tensor) -> Tensor:
    """Check a uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` batch; return it as a ``(B, 3, H, W)`` view."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"augment: images must be a uint8 tensor (B, H, W, 3) or (B, 3, H, W), got {got}")
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    if images.shape[1] != 3:
        raise ValueError(f"augment: images need 3 channels first or last, got shape {tuple(images.shape)}")
    return images


def _to_float_nchw(images: Tensor) -> Tensor:
    """uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` -> contiguous float32 ``(B, 3, H, W)`` in [0, 255]."""
    return _channels_first(images).to(dtype=torch.float32, memory_format=torch.contiguous_format)


def _image_hw(images: Tensor) -> tuple[int, int]:
    """(H, W) of a uint8 batch in either layout."""
    if images.ndim == 4 and images.shape[-1] == 3:
        return int(images.shape[1]), int(images.shape[2])
    return int(images.shape[-2]), int(images.shape[-1])


class Augment:
    """Callable training augmentation and eval normalization for one dataset.

    Args:
        config: the pipeline.
        mean, std: per-channel normalization (3 floats each, 0..1 scale).
        num_classes: number of classes (width of soft targets).
        native: on CPU batches, run the crop, RandAugment, ColorJitter, Normalize and per-batch
            Mixup/CutMix with the compiled kernels of ``augment_native`` where they are available (the same
            results, several times faster); False always runs the eager PyTorch ops.
    """

    def __init__(
        self,
        config: AugmentConfig,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int,
        native: bool = True,
    ) -> None:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"augment: mean and std need 3 values each, std > 0; got mean={mean}, std={std}")
        if num_classes < 1:
            raise ValueError(f"augment: num_classes must be >= 1, got {num_classes}")
        self.config = config
        self.mean = mean
        self.std = std
        self.num_classes = int(num_classes)
        self.native = bool(native)

    def __repr__(self) -> str:
        return (
            f"Augment({self.config}, mean={self.mean}, std={self.std}, num_classes={self.num_classes}, "
            f"native={self.native})"
        )

    def kernels(self, device: torch.device) -> NativeKernels | None:
        """The native kernels for a batch on ``device`` (None on a GPU, with ``native=False``, or without)."""
        if not self.native or device.type != "cpu":
            return None
        return augment_native.load()

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') of the training batches for stored images of size (height, width)."""
        size = self.config.out_size
        return (height, width) if size is None else (size, size)

    def sample(
        self, batch_size: int, height: int, width: int, generator: torch.Generator, mix: bool = True
    ) -> AugmentParams:
        """Draw every random parameter of one batch on the CPU.

        Args:
            batch_size: B.
            height, width: stored image size.
            generator: CPU generator (its state advances).
            mix: draw Mixup / CutMix (False: no mixing).

        Returns:
            AugmentParams.
        """
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(f"augment: generator must be a CPU torch.Generator, got {generator!r}")
        cfg, n = self.config, batch_size
        oh, ow = self.output_size(height, width)
        crop = None
        if cfg.crop == "rrc":
            crop = sample_resized_crop(n, height, width, cfg.crop_scale, cfg.crop_ratio, generator)
        elif cfg.crop == "pad":
            crop = sample_pad_crop(n, oh, ow, (oh, ow), cfg.crop_padding, generator)
        flip = torch.zeros(n, dtype=torch.bool)
        if cfg.hflip > 0:
            flip = torch.rand(n, generator=generator, dtype=torch.float64) < cfg.hflip
        randaug = None
        if cfg.randaug_ops > 0:
            randaug = sample_randaugment(
                n,
                cfg.randaug_ops,
                cfg.randaug_magnitude,
                cfg.randaug_bins,
                cfg.randaug_magnitude_std,
                oh,
                ow,
                generator,
            )
        jitter = None
        if max(cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation, cfg.jitter_hue) > 0:
            jitter = sample_color_jitter(
                n,
                cfg.jitter_brightness,
                cfg.jitter_contrast,
                cfg.jitter_saturation,
                cfg.jitter_hue,
                generator,
            )
        erasing = None
        if cfg.erase_p > 0:
            random_value = cfg.erase_value == "random"
            erasing = sample_erasing(
                n, oh, ow, cfg.erase_p, cfg.erase_scale, cfg.erase_ratio, random_value, generator
            )
        mixing = None
        if mix and (cfg.mixup_p > 0 or cfg.cutmix_p > 0):
            mixing = sample_mix(
                n,
                oh,
                ow,
                cfg.mixup_p,
                cfg.mixup_alpha,
                cfg.cutmix_p,
                cfg.cutmix_alpha,
                generator,
                per_sample=cfg.mix_per_sample,
                select=cfg.mix_select,
                lam_clip=cfg.mix_lambda_clip,
            )
        return AugmentParams(crop=crop, flip=flip, randaug=randaug, jitter=jitter, erase=erasing, mix=mixing)

    def augment_uint8(self, images: Tensor, params: AugmentParams, normalize: bool = False) -> Tensor:
        """Crop, flip, RandAugment and ColorJitter: the uint8-valued part of the pipeline.

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)``.
            params: draws from ``sample`` for this batch.
            normalize: also apply ``Normalize(mean, std)`` (the native kernels fuse it into ColorJitter).

        Returns:
            ``(B, 3, H', W')`` float32 whole numbers in [0, 255], or normalized with ``normalize``.
        """
        cfg = self.config
        kernels = self.kernels(images.device)
        out_hw = self.output_size(*_image_hw(images))
        crop = params.crop
        native_crop = (
            kernels is not None and cfg.crop == "rrc" and upsamples_exactly(crop, out_hw, cfg.interpolation)
        )
        if native_crop and (params.randaug is None or cfg.randaug_interpolation == "nearest"):
            return self._augment_fused(kernels, images, params, out_hw, normalize)
        if native_crop:
            ys, xs = crop_source_coords(crop, params.flip, out_hw)
            x = kernels.crop_bilinear(_channels_first(images), ys, xs)  # reads the uint8 batch directly
        else:
            x = _to_float_nchw(images)
            if crop is not None and cfg.crop == "rrc":
                x = resized_crop(x, crop, params.flip, out_hw, cfg.interpolation)
            else:
                x = resize(x, out_hw, cfg.interpolation)
                if crop is not None:
                    x = pad_crop(x, crop, params.flip, cfg.crop_padding)
                elif bool(params.flip.any()):
                    idx = params.flip.nonzero().squeeze(1).to(x.device)
                    x.index_copy_(0, idx, x.index_select(0, idx).flip(3))
            x = x.contiguous()
        if params.randaug is not None:
            x = randaugment_(x, params.randaug, cfg.randaug_interpolation, kernels)
        if params.jitter is not None and kernels is not None:
            jitter = params.jitter
            fused = self._normalization(x.device) if normalize else None
            return kernels.color_jitter_(x, jitter.order, jitter.factors, jitter.enabled, fused)
        if params.jitter is not None:
            x = color_jitter_(x, params.jitter)
        return self._normalize_(x) if normalize else x

    def _augment_fused(
        self,
        kernels: NativeKernels,
        images: Tensor,
        params: AugmentParams,
        out_hw: tuple[int, int],
        normalize: bool,
    ) -> Tensor:
        """``augment_uint8`` as one native call: every sample cropped, RandAugmented, jittered and
        normalized while it is in cache."""
        ys, xs = crop_source_coords(params.crop, params.flip, out_hw)
        randaug = jitter = None
        if params.randaug is not None:
            matrices, gxs, gys = randaugment_warps(params.randaug, *out_hw)
            randaug = (params.randaug.ops, params.randaug.values, matrices, gxs, gys)
        if params.jitter is not None:
            jitter = (params.jitter.order, params.jitter.factors, params.jitter.enabled)
        scales = self._normalization(images.device) if normalize else None
        return kernels.augment(_channels_first(images), ys, xs, randaug, jitter, scales)

    def _normalization(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(scale, shift)``: float32 ``(3,)`` tensors on ``device``, ``scale = 1 / (255 std)``,
        ``shift = mean / std``."""
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=torch.float32, device=device)
        shift = torch.tensor(
            [m / s for m, s in zip(self.mean, self.std, strict=True)], dtype=torch.float32, device=device
        )
        return scale, shift

    def _normalize_(self, x: Tensor) -> Tensor:
        """In place: ``(x / 255 - mean) / std`` for a float32 ``(B, 3, H, W)`` batch in [0, 255]."""
        scale, shift = self._normalization(x.device)
        return x.mul_(scale.view(1, 3, 1, 1)).sub_(shift.view(1, 3, 1, 1))

    def apply(self, images: Tensor, labels: Tensor, params: AugmentParams) -> tuple[Tensor, Tensor]:
        """Run the pipeline with given draws.

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` on any device.
            labels: ``(B,)`` int64.
            params: draws from ``sample`` for this batch.

        Returns:
            ``(x, targets)``: float32 ``(B, 3, H', W')`` on the images' device; int64 ``(B,)`` labels, or
            float32 ``(B, num_classes)`` soft targets when a mix was applied.
        """
        x = self.augment_uint8(images, params, normalize=True)
        if params.erase is not None:
            value = self.config.erase_value
            x = erase_(x, params.erase, 0.0 if isinstance(value, str) else value)
        labels = labels.to(device=x.device, dtype=torch.int64)
        if params.mix is not None and params.mix.any:
            kernels = self.kernels(x.device)
            return mix_(x, labels, params.mix, self.num_classes, self.config.mix_label_smoothing, kernels)
        return x, labels

    def __call__(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, mix: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Augment one training batch with fresh per-sample draws from ``generator``.

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` on any device.
            labels: ``(B,)`` int64.
            generator: CPU ``torch.Generator``.
            mix: False turns Mixup / CutMix off.

        Returns:
            ``(x, targets)`` as ``apply``.
        """
        height, width = _image_hw(images)
        params = self.sample(images.shape[0], height, width, generator, mix=mix)
        return self.apply(images, labels, params)

    def normalize(self, images: Tensor, size: int | None = None) -> Tensor:
        """Eval path: optional resize to ``size`` x ``size`` (antialiased, rounded), then normalize.

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` on any device.
            size: test resolution, or None to keep the stored size.

        Returns:
            ``(B, 3, H', W')`` float32.
        """
        x = _to_float_nchw(images)
        if size is not None:
            x = resize(x, (size, size), self.config.interpolation)
        return self._normalize_(x)


def build_augment(
    preset_or_config: str | AugmentConfig | Mapping[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
    native: bool = True,
) -> Augment:
    """Build the augmentation for a dataset.

    Args:
        preset_or_config: preset name, AugmentConfig, or a mapping of AugmentConfig fields (an optional
            'preset' entry names the base preset, default 'none').
        mean, std: per-channel normalization (3 floats each, 0..1 scale).
        num_classes: number of classes.
        native: use the compiled CPU kernels where they apply (see ``Augment``).

    Returns:
        Augment.
    """
    if isinstance(preset_or_config, str):
        config = augment_preset(preset_or_config)
    elif isinstance(preset_or_config, AugmentConfig):
        config = preset_or_config
    elif isinstance(preset_or_config, Mapping):
        fields = dict(preset_or_config)
        config = augment_preset(fields.pop("preset", "none"), **fields)
    else:
        raise ValueError(
            f"augment: expected a preset name, AugmentConfig or mapping, got {preset_or_config!r}"
        )
    return Augment(config, mean, std, num_classes, native=native)
