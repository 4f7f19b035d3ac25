"""The augmentation with its parameters drawn on the batch's device and applied without a host sync.

``AugmentConfig.device_params`` selects this path (``Augment.call_device``): made for GPU batches, where
reading a device value on the host (``.item()``, ``.tolist()``, ``.any()``, ``.nonzero()``, a boolean mask of
data-dependent size, a Python ``if`` on a tensor) stalls the queue of kernels until the device catches up.
Here nothing does:

- Per-sample parameters (crop boxes, flips, RandAugment ops and magnitudes, ColorJitter factors and order,
  erasing boxes and noise, per-sample mixing) are drawn on the batch's device with a generator of that
  device (``sample_device``), by the same samplers and distributions as the default path.
- The per-batch Mixup/CutMix choice, lambda and box are drawn on the host from a Python ``random.Random``
  (scalars that need no device), so that a batch without a mix keeps integer targets (and the run's label
  smoothing) while the branch costs no sync.
- Every step runs on all samples with per-sample parameters and shapes fixed by the config
  (``apply_device``): the crop is one ``grid_sample`` (or the antialiased matrix product where a crop may
  shrink), each RandAugment slot is one ``grid_sample`` for all geometric ops (the identity for the other
  samples), one blend for the blend ops (Color, Sharpness) and one table look-up for the lookup ops, which
  map each value through a per-sample, per-channel table (Identity, Brightness, Contrast, Posterize,
  Solarize, AutoContrast, Equalize), every op's tables built by running it on the 256 levels (the kinds of
  ``augment_table``); ColorJitter's hue step and erasing are selections (``torch.where``) instead of
  gathers.

Given the same parameters, crops, RandAugment and ColorJitter give the eager path's values bit for bit
(tests/test_augment_sync.py checks it), so torchvision's; erasing fills its boxes from a dense noise batch
and per-sample mixing is the eager ``lerp``. The random streams differ from the default path, which draws
everything on the CPU.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tinyswin.data import augment_ops as ops
from tinyswin.data.augment_backend import normalize_, to_float_nchw
from tinyswin.data.augment_config import AugmentConfig
from tinyswin.data.augment_geometry import (
    CropBoxes,
    _affine_grid,
    _clamped_grid,
    _resample_weights,
    affine_from_codes,
    resize,
)
from tinyswin.data.augment_mix import (
    MIX_CUTMIX,
    MIX_MIXUP,
    MIX_NONE,
    EraseParams,
    MixParams,
    _mix_per_sample_,
    mix_targets,
    soft_targets,
)
from tinyswin.data.augment_policy import ColorJitterParams, RandAugmentParams
from tinyswin.data.augment_sample import sample_colour, sample_crop, sample_erase, sample_mixing
from tinyswin.data.augment_table import Blend, Lookup, Views, affine_codes, rows_of

__all__ = ["BatchMix", "DeviceParams", "apply_device", "sample_batch_mix", "sample_device"]


@dataclass
class BatchMix:
    """One Mixup/CutMix choice for a whole batch: host scalars, and the partners on the device.

    Attributes:
        mode: MIX_NONE, MIX_MIXUP or MIX_CUTMIX.
        lam: weight of each sample's own image and label (CutMix: the fraction of its pixels left).
        box: CutMix box ``(y1, y2, x1, x2)``, clipped to the image.
        partner: ``(N,)`` int64 permutation on the batch's device.
    """

    mode: int
    lam: float
    box: tuple[int, int, int, int]
    partner: Tensor


@dataclass
class DeviceParams:
    """Every random draw for one batch, on the batch's device (None where a stage is off)."""

    crop: CropBoxes | None
    flip: Tensor  # (N,) bool
    randaug: RandAugmentParams | None
    jitter: ColorJitterParams | None
    erase: EraseParams | None  # noise dense (N, 3, H, W) when drawn
    mix: BatchMix | MixParams | None


def sample_batch_mix(
    n: int, height: int, width: int, cfg: AugmentConfig, rng: random.Random, generator: torch.Generator
) -> BatchMix:
    """The per-batch Mixup/CutMix draw of ``augment_mix.sample_mix`` with host scalars from ``rng``.

    Args:
        n: batch size.
        height, width: image size.
        cfg: the probabilities, alphas, selection rule and lambda bounds.
        rng: the host stream (mode, lambda, box).
        generator: the device stream (the partner permutation).

    Returns:
        BatchMix.
    """
    u0, u1 = rng.random(), rng.random()
    if u0 < cfg.mixup_p:
        mode = MIX_MIXUP
    elif (cfg.mix_select == "sequential" and u1 < cfg.cutmix_p) or (
        cfg.mix_select == "exclusive" and u0 < cfg.mixup_p + cfg.cutmix_p
    ):
        mode = MIX_CUTMIX
    else:
        mode = MIX_NONE
    alpha = cfg.cutmix_alpha if mode == MIX_CUTMIX else cfg.mixup_alpha
    lam = rng.betavariate(alpha, alpha) if alpha > 0 else 1.0
    lam = min(max(lam, cfg.mix_lambda_clip[0]), cfg.mix_lambda_clip[1])
    # a uniform permutation as the order of n uniform draws: sorted on the device whatever n is
    partner = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).argsort()
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    y1, y2 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    x1, x2 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    if mode == MIX_CUTMIX:
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
    elif mode == MIX_NONE:
        lam = 1.0
    return BatchMix(mode=mode, lam=lam, box=(y1, y2, x1, x2), partner=partner)


def sample_device(
    cfg: AugmentConfig,
    n: int,
    height: int,
    width: int,
    out_hw: tuple[int, int],
    generator: torch.Generator,
    rng: random.Random,
    mix: bool = True,
) -> DeviceParams:
    """Draw a batch's parameters on ``generator``'s device, a generator of the batch's device, by the stages
    of ``augment_sample.sample_params`` (same arguments); the flips are always drawn, the erasing noise as a
    dense batch, the per-batch mixing on the host from ``rng``.

    Returns:
        DeviceParams.
    """
    crop = sample_crop(cfg, n, height, width, out_hw, generator)
    flip = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device) < cfg.hflip
    randaug, jitter = sample_colour(cfg, n, out_hw, generator)
    erase = sample_erase(cfg, n, out_hw, generator, dense_noise=True)
    mixing: BatchMix | MixParams | None = None
    if mix and (cfg.mixup_p > 0 or cfg.cutmix_p > 0):
        if cfg.mix_per_sample:
            mixing = sample_mixing(cfg, n, out_hw, generator)
        else:
            mixing = sample_batch_mix(n, *out_hw, cfg, rng, generator)
    return DeviceParams(crop=crop, flip=flip, randaug=randaug, jitter=jitter, erase=erase, mix=mixing)


# ---------------------------------------------------------------------------------------------------------
# crop


def crop_static(
    x: Tensor, cfg: AugmentConfig, boxes: CropBoxes | None, flip: Tensor, out_hw: tuple[int, int]
) -> Tensor:
    """Crop (or resize) to ``out_hw`` and mirror the flipped samples; the path is chosen by the config and the
    sizes alone.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255].
        cfg: crop kind, interpolation, padding.
        boxes: crop boxes on ``x``'s device, or None (``crop='none'``).
        flip: ``(N,)`` bool on ``x``'s device.
        out_hw: output size.

    Returns:
        contiguous float32 ``(N, 3, oh, ow)`` whole numbers.
    """
    n, _, h, w = x.shape
    oh, ow = out_hw
    if boxes is not None and cfg.crop == "rrc":
        if cfg.interpolation == "bilinear" and oh >= h and ow >= w:  # no box can shrink: one grid_sample
            grid = _clamped_grid(boxes, flip, (h, w), out_hw, x.device)
            return F.grid_sample(
                x, grid, mode="bilinear", padding_mode="border", align_corners=False
            ).round_()
        wy = _resample_weights(
            boxes.top, boxes.height, h, oh, cfg.interpolation, None, x.device
        )  # (N, oh, H)
        wx = _resample_weights(
            boxes.left, boxes.width, w, ow, cfg.interpolation, flip, x.device
        )  # (N, ow, W)
        out = torch.matmul(
            torch.matmul(wy.unsqueeze(1), x), wx.transpose(1, 2).unsqueeze(1)
        )  # (N, 3, oh, ow)
        return out.clamp_(0.0, 255.0).round_()
    x = resize(x, out_hw, cfg.interpolation)
    if boxes is not None:  # 'pad': RandomCrop with zero padding, by two gathers
        p = cfg.crop_padding
        padded = F.pad(x, (p, p, p, p))  # (N, 3, oh+2p, ow+2p)
        rows = boxes.top.unsqueeze(1) + torch.arange(oh, device=x.device)  # (N, oh)
        cols = torch.arange(ow, device=x.device).expand(n, ow)
        cols = torch.where(flip.unsqueeze(1), ow - 1 - cols, cols) + boxes.left.unsqueeze(1)  # (N, ow)
        out = padded.gather(2, rows.view(n, 1, oh, 1).expand(n, 3, oh, padded.shape[3]))
        return out.gather(3, cols.view(n, 1, 1, ow).expand(n, 3, oh, ow))
    return torch.where(flip.view(n, 1, 1, 1), x.flip(3), x).contiguous()


# ---------------------------------------------------------------------------------------------------------
# RandAugment


def _blend_slot_(x: Tensor, column: Tensor, values: Tensor, views: Views) -> Tensor:
    """In place: the blend ops (``augment_table.Blend``) for the samples that drew them, as one blend of every
    sample with its op's degenerate image; every other sample is blended with factor 1, which leaves it as
    it is.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers; overwritten.
        column, values: the slot's ops and arguments, ``(N,)`` each.
        views: ``x``'s views (the degenerate images are made from them).

    Returns:
        ``x``.
    """
    n = x.shape[0]
    blended = torch.zeros_like(column, dtype=torch.bool)
    degenerate, fresh = None, False
    for k, row in rows_of(Blend):
        image = row.op.degenerate(views)
        if image is None:  # the op leaves images of this size as they are
            continue
        chosen = column == k
        blended |= chosen
        if degenerate is not None:
            degenerate, fresh = torch.where(chosen.view(n, 1, 1, 1), image, degenerate), True
        else:
            degenerate = image
    if degenerate is None:
        return x
    factor = torch.where(blended, 1.0 + values, torch.ones_like(values))
    weight = ops.complement(factor, x)
    # a row's own image (the gray image, which Contrast reads after) is not overwritten; a selection may be
    weighted = degenerate.mul_(weight) if fresh else degenerate * weight
    return x.mul_(ops.per_sample(factor, x)).add_(weighted).clamp_(0.0, 255.0).floor_()


def _lookup_tables(views: Views, column: Tensor, values: Tensor) -> Tensor:
    """``(N, 3, 256)`` float32: the table of each sample's lookup op (``augment_table.Lookup``; the identity
    for the other ops), built by running every lookup op on the 256 levels with statistics of ``views``.

    Args:
        views: the images ``(N, 3, H, W)``, float32 whole numbers, and their views.
        column, values: the slot's ops and arguments, ``(N,)`` each.
    """
    x = views.x
    n = x.shape[0]
    levels = torch.arange(256, dtype=x.dtype, device=x.device).expand(n, 3, 1, 256).contiguous()
    out = levels  # (N, 3, 1, 256)
    for k, row in rows_of(Lookup):
        if row.identity:
            continue
        chosen = column == k
        arg = torch.where(chosen, values, 0.0)  # a finite argument for the samples whose table is not kept
        stats = None if row.op.stats is None else row.op.stats(views)
        out = torch.where(chosen.view(n, 1, 1, 1), row.op.map_(levels.clone(), stats, arg), out)
    return out.view(n, 3, 256)


def randaugment_static_(x: Tensor, params: RandAugmentParams, interpolation: str = "nearest") -> Tensor:
    """Each sample's RandAugment ops in order, all samples at once per op slot: one warp (the geometric ops;
    the identity elsewhere), the Color/Sharpness blend, then one table look-up (the other pixel ops).

    Args:
        x: contiguous float32 ``(N, 3, H, W)`` whole numbers in [0, 255].
        params: RandAugment draws on ``x``'s device.
        interpolation: 'nearest' or 'bilinear' for the warps.

    Returns:
        float32 ``(N, 3, H, W)`` (``x`` overwritten where possible).
    """
    h, w = x.shape[-2:]
    codes = affine_codes(str(x.device))
    for slot in range(params.ops.shape[1]):
        column, values = params.ops[:, slot], params.values[:, slot]  # (N,), (N,)
        theta = affine_from_codes(codes[column], values, h, w)  # (N, 2, 3); identity for non-geometric ops
        x = F.grid_sample(
            x, _affine_grid(theta, h, w), mode=interpolation, padding_mode="zeros", align_corners=False
        )
        if interpolation != "nearest":
            x.round_()
        views = Views(x, sync_free=True)  # its gray image: Color blends with it, Contrast with its mean
        x = _blend_slot_(x, column, values, views)
        # the blend changed only the samples that drew a blend op, whose gray image no lookup op reads
        views = Views(x, views.gray, sync_free=True)
        x = ops.lookup_(x, _lookup_tables(views, column, values), views.values)
    return x


# ---------------------------------------------------------------------------------------------------------
# ColorJitter, erasing, mixing


def color_jitter_static_(x: Tensor, params: ColorJitterParams) -> Tensor:
    """``augment_policy.color_jitter_`` for all samples at once: each of the four steps is one blend (factor 1
    for samples whose step is hue or an op that is off) and one hue shift kept where drawn.

    Args:
        x: contiguous float32 ``(N, 3, H, W)`` whole numbers; overwritten.
        params: ColorJitter draws on ``x``'s device.

    Returns:
        ``x``.
    """
    n = x.shape[0]
    enabled = params.enabled
    for step in range(4):
        op = params.order[:, step]  # (N,)
        on = [(op == k) & enabled[k] for k in range(4)]  # (N,) bool per op
        is_blend = on[0] | on[1] | on[2]
        factor = torch.where(
            is_blend,
            params.factors.gather(1, op.view(n, 1)).squeeze(1),
            torch.ones_like(params.factors[:, 0]),
        )
        gray = ops.grayscale(x)  # (N, 1, H, W)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        other = ops.complement(factor, x)
        use_gray, use_mean = on[2].to(x.dtype).view(n, 1, 1, 1), on[1].to(x.dtype).view(n, 1, 1, 1)
        weighted = gray.mul_(use_gray * other).add_(mean.mul_(other).mul_(use_mean))
        x.mul_(ops.per_sample(factor, x)).add_(weighted).clamp_(0.0, 255.0).floor_()
        if enabled[3]:
            shifted = ops.adjust_hue_(x.clone(), torch.where(on[3], params.factors[:, 3], 0.0))
            x = torch.where(on[3].view(n, 1, 1, 1), shifted, x)
    return x


def erase_dense_(x: Tensor, params: EraseParams, value: float | tuple[float, ...] = 0.0) -> Tensor:
    """In place: fill each chosen sample's box with its dense noise (``sample_erasing(dense_noise=True)``) or
    with ``value``, by a mask of the boxes (no gather of data-dependent size).

    Args:
        x: ``(N, C, H, W)`` float32 (normalized); overwritten.
        params: erasing draws on ``x``'s device.
        value: constant fill (scalar or one per channel) when there is no noise.

    Returns:
        ``x``.
    """
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    top, left = params.top.view(n, 1), params.left.view(n, 1)
    in_rows = (rows >= top) & (rows < top + params.height.view(n, 1))  # (N, H)
    in_cols = (cols >= left) & (cols < left + params.width.view(n, 1))  # (N, W)
    mask = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1) & params.apply.view(n, 1, 1)).unsqueeze(
        1
    )  # (N,1,H,W)
    if params.noise is not None:
        fill = params.noise
    else:
        per_channel = [float(value)] * c if isinstance(value, (int, float)) else [float(v) for v in value]
        fill = torch.stack([torch.full((h, w), v, dtype=x.dtype, device=x.device) for v in per_channel])
    return x.copy_(torch.where(mask, fill, x))


def mix_static_(
    x: Tensor, labels: Tensor, params: BatchMix | MixParams, num_classes: int, smoothing: float
) -> tuple[Tensor, Tensor]:
    """Mixup / CutMix without a host sync: a per-batch choice (``BatchMix``) as ``augment_mix._mix_batch_``
    with host scalars (integer labels kept when the batch drew none), per-sample ones as the eager ``lerp``
    (always soft targets).

    Returns:
        ``(x, targets)``: ``x`` (overwritten) and int64 ``(N,)`` labels or float32 ``(N, K)`` soft targets.
    """
    if isinstance(params, MixParams):
        return _mix_per_sample_(x, params), mix_targets(labels, params, num_classes, smoothing)
    if params.mode == MIX_NONE:
        return x, labels
    partner = params.partner
    if params.mode == MIX_MIXUP:
        other = x.index_select(0, partner).mul_(1.0 - params.lam)  # before x changes
        x.mul_(params.lam).add_(other)
    else:
        y1, y2, x1, x2 = params.box
        x[:, :, y1:y2, x1:x2] = x[:, :, y1:y2, x1:x2].index_select(0, partner)
    targets = soft_targets(labels, num_classes, smoothing)  # (N, K)
    lam = float(np.float32(params.lam))  # lambda as float32, as mix_targets
    return x, targets * lam + targets.index_select(0, partner) * (1.0 - lam)


def apply_device(
    cfg: AugmentConfig,
    images: Tensor,
    labels: Tensor,
    params: DeviceParams,
    normalization: tuple[Tensor, Tensor],
    num_classes: int,
    out_hw: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """The whole pipeline on the batch's device with ``sample_device``'s draws, without a host sync.

    Args:
        cfg: the pipeline.
        images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)``.
        labels: ``(B,)`` int64 on the images' device.
        params: draws on the images' device.
        normalization: ``(scale, shift)`` float32 ``(3,)`` on the images' device.
        num_classes: K.
        out_hw: output size.

    Returns:
        ``(x, targets)`` as ``Augment.apply``.
    """
    x = crop_static(to_float_nchw(images), cfg, params.crop, params.flip, out_hw)
    if params.randaug is not None:
        x = randaugment_static_(x, params.randaug, cfg.randaug_interpolation)
    if params.jitter is not None:
        x = color_jitter_static_(x, params.jitter)
    x = normalize_(x, normalization)
    if params.erase is not None:
        x = erase_dense_(x, params.erase, 0.0 if isinstance(cfg.erase_value, str) else cfg.erase_value)
    labels = labels.to(device=x.device, dtype=torch.int64)
    if params.mix is None:
        return x, labels
    return mix_static_(x, labels, params.mix, num_classes, cfg.mix_label_smoothing)
