"""The two backends of the augmentation pipeline: the eager PyTorch ops and the native CPU kernels.

``Augment`` runs one sequence of steps (crop and flip, RandAugment, ColorJitter with Normalize,
RandomErasing, Mixup / CutMix) on a backend chosen once per device type (``choose_backend``):

- ``EagerBackend``: batched PyTorch ops (``augment_geometry``, ``augment_policy``, ``augment_mix``) on any
  device.
- ``NativeBackend``: the compiled kernels of ``augment_native`` on CPU batches. Where the kernels apply,
  crop, RandAugment, ColorJitter and Normalize are one call (``augment_uint8``, where ``fuses``), one sample
  at a time while it is in cache. A step the kernels cannot do exactly falls back to the eager op, each
  decided by one predicate: the crop (``native_crop``: a bilinear RandomResizedCrop that does not shrink,
  to power-of-two sides of at most 64), the RandAugment warps (``native_warps``: nearest neighbour; the
  pixel ops always run natively) and the mix (``native_mix``: one mode for the whole batch). Both backends
  give the same results bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinyswin.data import augment_native
from tinyswin.data.augment_config import AugmentConfig
from tinyswin.data.augment_geometry import (
    CropBoxes,
    crop_source_coords,
    pad_crop,
    resize,
    resized_crop,
    upsamples_exactly,
)
from tinyswin.data.augment_mix import MIX_NONE, EraseParams, MixParams, erase_, mix_, mix_targets
from tinyswin.data.augment_native import NativeKernels
from tinyswin.data.augment_policy import (
    ColorJitterParams,
    RandAugmentParams,
    color_jitter_,
    geometric_slot_,
    randaugment_,
    randaugment_warps,
)
from tinyswin.data.augment_sample import AugmentParams

__all__ = [
    "AugmentParams",
    "EagerBackend",
    "NativeBackend",
    "channels_first",
    "choose_backend",
    "normalization_constants",
    "normalize_",
    "to_float_nchw",
]


def channels_first(images: Tensor) -> Tensor:
    """Check a uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` batch; return it as a ``(B, 3, H, W)`` view."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"augment: images must be a uint8 tensor (B, H, W, 3) or (B, 3, H, W), got {got}")
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    if images.shape[1] != 3:
        raise ValueError(f"augment: images need 3 channels first or last, got shape {tuple(images.shape)}")
    return images


def to_float_nchw(images: Tensor) -> Tensor:
    """uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` -> contiguous float32 ``(B, 3, H, W)`` in [0, 255]."""
    return channels_first(images).to(dtype=torch.float32, memory_format=torch.contiguous_format)


def normalization_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` for `normalize_`: float32 ``(3,)`` tensors on ``device``, ``scale = 1 / (255 std)``,
    ``shift = mean / std``."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32, device=device)
    return scale, shift


def normalize_(x: Tensor, normalization: tuple[Tensor, Tensor]) -> Tensor:
    """In place: ``x * scale - shift`` per channel, i.e. ``(x / 255 - mean) / std``.

    Args:
        x: ``(B, 3, H, W)`` float32 in [0, 255]; overwritten.
        normalization: ``(scale, shift)`` float32 ``(3,)`` tensors on ``x``'s device.

    Returns:
        ``x``.
    """
    scale, shift = normalization
    return x.mul_(scale.view(1, 3, 1, 1)).sub_(shift.view(1, 3, 1, 1))


def choose_backend(config: AugmentConfig, device_type: str, native: bool = True) -> EagerBackend:
    """The backend for batches on devices of ``device_type``: ``NativeBackend`` for CPU batches with
    ``native`` when the kernels load (``augment_native.load``), else ``EagerBackend``."""
    kernels = augment_native.load() if native and device_type == "cpu" else None
    return EagerBackend(config) if kernels is None else NativeBackend(config, kernels)


class EagerBackend:
    """The pipeline's steps as batched PyTorch ops, on the batch's device.

    Args:
        config: the pipeline (crop kind, interpolations, padding, erase value).
    """

    kernels: NativeKernels | None = None

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernels={self.kernels!r})"

    def augment_uint8(
        self,
        images: Tensor,
        params: AugmentParams,
        out_hw: tuple[int, int],
        normalization: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """Crop and flip, RandAugment, ColorJitter and, where given, Normalize, step by step.

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)``.
            params: the batch's draws.
            out_hw: output (height, width).
            normalization: ``(scale, shift)`` float32 ``(3,)`` on the images' device, or None.

        Returns:
            float32 ``(B, 3, H', W')``: whole numbers in [0, 255], or normalized.
        """
        x = self.crop(images, params.crop, params.flip, out_hw)
        if params.randaug is not None:
            x = self.randaugment(x, params.randaug)
        return self.color_jitter_normalize(x, params.jitter, normalization)

    def crop(self, images: Tensor, boxes: CropBoxes | None, flip: Tensor, out_hw: tuple[int, int]) -> Tensor:
        """Crop (or resize) to ``out_hw`` and mirror the flipped samples.

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)``.
            boxes: crop boxes of ``Augment.sample`` (``crop='rrc'`` or ``'pad'``), or None for a plain
                resize.
            flip: ``(B,)`` bool CPU tensor.
            out_hw: output (height, width).

        Returns:
            contiguous float32 ``(B, 3, H', W')`` whole numbers in [0, 255].
        """
        cfg = self.config
        x = to_float_nchw(images)
        if boxes is not None and cfg.crop == "rrc":
            return resized_crop(x, boxes, flip, out_hw, cfg.interpolation).contiguous()
        x = resize(x, out_hw, cfg.interpolation)
        if boxes is not None:
            return pad_crop(x, boxes, flip, cfg.crop_padding).contiguous()
        if bool(flip.any()):
            idx = flip.nonzero().squeeze(1).to(x.device)
            x.index_copy_(0, idx, x.index_select(0, idx).flip(3))
        return x.contiguous()

    def randaugment(self, x: Tensor, params: RandAugmentParams) -> Tensor:
        """In place: each sample's RandAugment ops (``augment_policy.randaugment_``).

        Args:
            x: contiguous float32 ``(B, 3, H, W)`` whole numbers in [0, 255]; overwritten.
            params: RandAugment draws for the B samples.

        Returns:
            ``x``.
        """
        return randaugment_(x, params, self.config.randaug_interpolation)

    def color_jitter_normalize(
        self, x: Tensor, jitter: ColorJitterParams | None, normalization: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """In place: ColorJitter (where drawn), then Normalize (where given).

        Args:
            x: contiguous float32 ``(B, 3, H, W)`` whole numbers in [0, 255]; overwritten.
            jitter: ColorJitter draws, or None.
            normalization: ``(scale, shift)`` float32 ``(3,)`` on ``x``'s device, or None.

        Returns:
            ``x``.
        """
        if jitter is not None:
            x = color_jitter_(x, jitter)
        return x if normalization is None else normalize_(x, normalization)

    def erase(self, x: Tensor, params: EraseParams) -> Tensor:
        """In place: RandomErasing of a normalized float32 ``(B, 3, H, W)`` batch; returns ``x``."""
        value = self.config.erase_value
        return erase_(x, params, 0.0 if isinstance(value, str) else value)

    def mix(
        self, x: Tensor, labels: Tensor, params: MixParams, num_classes: int, smoothing: float
    ) -> tuple[Tensor, Tensor]:
        """In place: Mixup / CutMix of the images and soft targets (``augment_mix.mix_``).

        Args:
            x: contiguous float32 ``(B, 3, H, W)``; overwritten.
            labels: ``(B,)`` int64 on ``x``'s device.
            params: mix draws.
            num_classes: K.
            smoothing: label smoothing folded into the targets.

        Returns:
            ``(x, targets)`` with ``(B, K)`` float32 targets.
        """
        return mix_(x, labels, params, num_classes, smoothing)


class NativeBackend(EagerBackend):
    """The pipeline's steps in the compiled kernels for CPU batches, the eager ops where they are not exact.

    Args:
        config: the pipeline.
        kernels: the loaded kernels (``augment_native.load()``).
    """

    def __init__(self, config: AugmentConfig, kernels: NativeKernels) -> None:
        super().__init__(config)
        self.kernels = kernels
        self.native_warps = config.randaug_interpolation == "nearest"  # the kernels warp nearest only

    def native_crop(self, boxes: CropBoxes | None, out_hw: tuple[int, int]) -> bool:
        """Whether the crop kernel gives the eager crop's result: a bilinear RandomResizedCrop that upsamples
        exactly (``augment_geometry.upsamples_exactly``)."""
        return (
            boxes is not None
            and self.config.crop == "rrc"
            and upsamples_exactly(boxes, out_hw, self.config.interpolation)
        )

    @staticmethod
    def native_mix(params: MixParams) -> bool:
        """Whether the mix kernel applies: one mode (Mixup or CutMix) for the whole batch."""
        return not params.per_sample and int(params.mode[0]) != MIX_NONE

    def fuses(self, params: AugmentParams, out_hw: tuple[int, int]) -> bool:
        """Whether one kernel call does steps 1-4: a native crop and, if drawn, RandAugment with native
        warps."""
        return self.native_crop(params.crop, out_hw) and (params.randaug is None or self.native_warps)

    def augment_uint8(
        self,
        images: Tensor,
        params: AugmentParams,
        out_hw: tuple[int, int],
        normalization: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """``EagerBackend.augment_uint8`` in one kernel call where ``fuses``, each sample while it is in
        cache; else step by step."""
        if not self.fuses(params, out_hw):
            return super().augment_uint8(images, params, out_hw, normalization)
        ys, xs = crop_source_coords(params.crop, params.flip, out_hw)
        randaug = jitter = None
        if params.randaug is not None:
            matrices, gxs, gys = randaugment_warps(params.randaug, *out_hw)
            randaug = (params.randaug.ops, params.randaug.values, matrices, gxs, gys)
        if params.jitter is not None:
            jitter = (params.jitter.order, params.jitter.factors, params.jitter.enabled)
        return self.kernels.augment(channels_first(images), ys, xs, randaug, jitter, normalization)

    def crop(self, images: Tensor, boxes: CropBoxes | None, flip: Tensor, out_hw: tuple[int, int]) -> Tensor:
        """``EagerBackend.crop``, by the crop kernel (reading the uint8 batch) where ``native_crop``."""
        if not self.native_crop(boxes, out_hw):
            return super().crop(images, boxes, flip, out_hw)
        ys, xs = crop_source_coords(boxes, flip, out_hw)
        return self.kernels.crop_bilinear(channels_first(images), ys, xs)

    def randaugment(self, x: Tensor, params: RandAugmentParams) -> Tensor:
        """``EagerBackend.randaugment`` with one kernel call per op slot; without ``native_warps`` the
        geometric ops of each slot run eagerly first and the kernel does the pixel ops."""
        warps = randaugment_warps(params, *x.shape[-2:]) if self.native_warps else None
        for slot in range(params.ops.shape[1]):
            column, values = params.ops[:, slot], params.values[:, slot]
            if warps is None:
                geometric_slot_(x, column, values, self.config.randaug_interpolation)
            slot_warps = None if warps is None else (warps[0][:, slot], warps[1], warps[2])
            self.kernels.randaugment_slot_(x, column, values, slot_warps)
        return x

    def color_jitter_normalize(
        self, x: Tensor, jitter: ColorJitterParams | None, normalization: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """``EagerBackend.color_jitter_normalize``, by the kernel (Normalize fused) where jitter is drawn."""
        if jitter is None:
            return super().color_jitter_normalize(x, None, normalization)
        return self.kernels.color_jitter_(x, jitter.order, jitter.factors, jitter.enabled, normalization)

    def mix(
        self, x: Tensor, labels: Tensor, params: MixParams, num_classes: int, smoothing: float
    ) -> tuple[Tensor, Tensor]:
        """``EagerBackend.mix``, the images by the kernel in place (no copy of the batch) where
        ``native_mix``."""
        if not self.native_mix(params):
            return super().mix(x, labels, params, num_classes, smoothing)
        targets = mix_targets(labels, params, num_classes, smoothing)
        box = tuple(params.box[0].tolist())
        self.kernels.mix_batch_(x, params.partner, int(params.mode[0]), float(params.lam[0]), box)
        return x, targets
