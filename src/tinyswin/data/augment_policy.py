"""RandAugment and ColorJitter for whole batches, each sample with its own ops, magnitudes and order.

Parameters are drawn on the CPU with a ``torch.Generator`` (``sample_*``) with the distributions of
``torchvision.transforms.RandAugment`` and ``ColorJitter``; the ops are then applied to a float batch of
whole numbers in [0, 255] (uint8 semantics, see ``augment_ops``) on any device. The Python loops run over
op kinds and op slots, never over samples: for each slot, the samples that drew one op are gathered,
transformed together and written back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from tinyswin.data import augment_ops as ops
from tinyswin.data.augment_geometry import (
    AFFINE_PARAMS,
    affine_from_codes,
    affine_grid_parts,
    translate_,
    warp_affine,
)
from tinyswin.data.augment_table import (
    RANDAUGMENT,
    RANDAUGMENT_OPS,
    Geometric,
    affine_codes,
    op_row,
    signed_ops,
)

__all__ = [
    "COLOR_JITTER_OPS",
    "RANDAUGMENT_OPS",
    "ColorJitterParams",
    "RandAugmentParams",
    "apply_randaugment_op",
    "color_jitter_",
    "geometric_slot_",
    "pixel_slot_",
    "randaugment_",
    "randaugment_values",
    "randaugment_warps",
    "sample_color_jitter",
    "sample_randaugment",
]

COLOR_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
_BLEND_ROWS = 64  # samples per blend pass on a CPU: about 3 MB of float32 64x64 images, cache-sized


@dataclass
class RandAugmentParams:
    """Per-sample RandAugment draws (CPU tensors).

    Attributes:
        ops: ``(N, num_ops)`` int64 indices into ``RANDAUGMENT_OPS``, applied left to right.
        magnitudes: ``(N, num_ops)`` float64 magnitude bins (fractional when a magnitude std is set).
        values: ``(N, num_ops)`` float64 signed op arguments, as torchvision's ``_apply_op`` receives them
            (shear factor, translation in pixels, degrees, enhancement offset, bits, threshold).
    """

    ops: Tensor
    magnitudes: Tensor
    values: Tensor


def randaugment_values(op: str, magnitude: Tensor, num_bins: int, height: int, width: int) -> Tensor:
    """Unsigned op arguments for magnitude bins, from the op's magnitude range (``augment_table``).

    Whole bins give exactly torchvision's float32 table entries; fractional bins (magnitude std)
    interpolate linearly between neighbouring entries (posterize: bits from the rounded formula).

    Args:
        op: name from ``RANDAUGMENT_OPS``.
        magnitude: ``(N,)`` float64 bins in ``[0, num_bins - 1]``.
        num_bins: number of magnitude bins.
        height, width: image size (translations scale with it).

    Returns:
        ``(N,)`` float64 values.
    """
    return op_row(op).values(magnitude, num_bins, height, width)


@lru_cache(maxsize=16)
def _value_table(num_bins: int, height: int, width: int, device: str = "cpu") -> Tensor:
    """``(num_ops, num_bins)`` float64 unsigned op arguments of every whole bin on ``device`` (read-only,
    built once per device)."""
    bins = torch.arange(num_bins, dtype=torch.float64)
    table = torch.stack([row.values(bins, num_bins, height, width) for row in RANDAUGMENT])
    return table.to(device)


def sample_randaugment(
    n: int,
    num_ops: int,
    magnitude: float,
    num_bins: int,
    magnitude_std: float,
    height: int,
    width: int,
    generator: torch.Generator,
) -> RandAugmentParams:
    """Draw RandAugment ops, magnitudes and signs for ``n`` samples.

    Each sample draws ``num_ops`` ops uniformly from the table (with replacement, as torchvision) and, for
    signed ops, a sign with probability 1/2. With ``magnitude_std > 0`` each op draws its bin from
    ``N(magnitude, magnitude_std)`` clipped to ``[0, num_bins - 1]`` (timm's ``mstd``); ``inf`` draws it
    uniformly from ``[0, magnitude]``.

    Args:
        n: number of samples.
        num_ops: ops per sample.
        magnitude: magnitude bin.
        num_bins: number of bins.
        magnitude_std: std of the magnitude bin per op (0 = fixed).
        height, width: image size.
        generator: a generator; the draws are made on its device.

    Returns:
        RandAugmentParams (on the generator's device).
    """
    dev = generator.device
    op_idx = torch.randint(len(RANDAUGMENT_OPS), (n, num_ops), generator=generator, device=dev)
    negate = torch.randint(2, (n, num_ops), generator=generator, device=dev).bool()
    mags = torch.full((n, num_ops), float(magnitude), dtype=torch.float64, device=dev)
    if math.isinf(magnitude_std):
        mags = mags * torch.rand(n, num_ops, generator=generator, dtype=torch.float64, device=dev)
    elif magnitude_std > 0:
        noise = torch.randn(n, num_ops, generator=generator, dtype=torch.float64, device=dev)
        mags = mags + magnitude_std * noise
    mags = mags.clamp(0.0, num_bins - 1)
    table = _value_table(num_bins, height, width, str(dev))  # (num_ops, num_bins)
    lo = mags.floor().to(torch.int64)  # (n, num_ops)
    hi = (lo + 1).clamp(max=num_bins - 1)
    start = table[op_idx, lo]
    values = start + (mags - lo.double()) * (table[op_idx, hi] - start)  # whole bins: exactly the table
    for k, row in enumerate(RANDAUGMENT):
        if row.magnitude is not None and not row.magnitude.interpolates:  # fractional bins by its formula
            values = torch.where(op_idx == k, row.values(mags, num_bins, height, width), values)
    signed = signed_ops(str(dev))[op_idx]
    values = torch.where(signed & negate, -values, values)
    return RandAugmentParams(ops=op_idx, magnitudes=mags, values=values)


def apply_randaugment_op(x: Tensor, op: str, values: Tensor, interpolation: str = "nearest") -> Tensor:
    """One RandAugment op on every sample of ``x`` with per-sample arguments.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255].
        op: name from ``RANDAUGMENT_OPS``.
        values: ``(N,)`` float64 signed arguments (``RandAugmentParams.values``).
        interpolation: 'nearest' (torchvision's default) or 'bilinear' for the geometric ops.

    Returns:
        ``(N, 3, H, W)`` float32 whole numbers (a new tensor).
    """
    row = op_row(op)
    if isinstance(row.op, Geometric):
        code = torch.full((len(values),), AFFINE_PARAMS.index(row.op.affine))
        return warp_affine(x, affine_from_codes(code, values, x.shape[-2], x.shape[-1]), interpolation)
    return row.op.apply_(x.clone(), values)


def _groups(column: Tensor, count: int) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(k, cpu_indices)`` for each value ``k`` in ``range(count)`` present in ``column`` (N,)."""
    order = torch.argsort(column, stable=True)
    counts = torch.bincount(column, minlength=count).tolist()
    start = 0
    for k, c in enumerate(counts):
        if c:
            yield k, order[start : start + c]
        start += c


@lru_cache(maxsize=1)
def _warped() -> Tensor:
    """``(num_ops,)`` bool CPU, by op index: the geometric ops that resample (the others shift or are not
    geometric)."""
    return torch.tensor([isinstance(row.op, Geometric) and row.op.shift is None for row in RANDAUGMENT])


@lru_cache(maxsize=2)
def _shifts(axis: str) -> Tensor:
    """``(num_ops,)`` bool CPU, by op index: the ops that shift by whole pixels along ``axis`` ('x', 'y')."""
    return torch.tensor([isinstance(row.op, Geometric) and row.op.shift == axis for row in RANDAUGMENT])


def randaugment_warps(params: RandAugmentParams, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """The warps of the native kernels: torchvision's affine grid factors for every ShearX, ShearY and Rotate.

    Args:
        params: RandAugment draws for N samples and S op slots.
        height, width: image size.

    Returns:
        ``(matrices, xs, ys)``: float32 ``(N, S, 3, 2)`` rescaled inverse matrices (zeros for other ops) and
        the ``(W,)``, ``(H,)`` grid bases (see ``augment_geometry.affine_grid_parts``).
    """
    n, slots = params.ops.shape
    flat_ops, flat_values = params.ops.reshape(-1), params.values.reshape(-1)  # (N * S,)
    idx = _warped()[flat_ops].nonzero().squeeze(1)
    theta = affine_from_codes(affine_codes()[flat_ops[idx]], flat_values[idx], height, width)  # (M, 2, 3)
    rescaled, xs, ys = affine_grid_parts(theta, height, width)
    matrices = torch.zeros(n * slots, 3, 2).index_copy_(0, idx, rescaled)
    return matrices.view(n, slots, 3, 2), xs, ys  # (N * S, 3, 2) -> (N, S, 3, 2)


def geometric_slot_(x: Tensor, column: Tensor, values: Tensor, interpolation: str = "nearest") -> Tensor:
    """In place: the geometric ops (ShearX, ShearY, Rotate, TranslateX, TranslateY) of one op slot.

    The samples that drew a warp are warped together (one ``grid_sample`` with per-sample matrices); the
    translations shift by whole pixels.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255], contiguous; overwritten.
        column: ``(N,)`` int64 indices into ``RANDAUGMENT_OPS`` (one slot of ``RandAugmentParams.ops``).
        values: ``(N,)`` float64 signed op arguments.
        interpolation: 'nearest' or 'bilinear' for the warps.

    Returns:
        ``x``.
    """
    height, width = x.shape[-2:]
    idx = _warped()[column].nonzero().squeeze(1)
    if idx.numel():
        theta = affine_from_codes(affine_codes()[column[idx]], values[idx], height, width)
        dev_idx = idx.to(x.device)
        x.index_copy_(0, dev_idx, warp_affine(x.index_select(0, dev_idx), theta, interpolation))
    pixels = torch.trunc(values).to(torch.int64)  # torchvision: translate=[int(magnitude), 0]
    dx = torch.where(_shifts("x")[column], pixels, 0)
    dy = torch.where(_shifts("y")[column], pixels, 0)
    if bool((dx != 0).any() or (dy != 0).any()):
        translate_(x, dx, dy)
    return x


def pixel_slot_(x: Tensor, column: Tensor, values: Tensor) -> Tensor:
    """In place: the pixel ops of one op slot; the samples of each op are gathered, transformed, written back.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255], contiguous; overwritten.
        column: ``(N,)`` int64 indices into ``RANDAUGMENT_OPS``.
        values: ``(N,)`` float64 signed op arguments.

    Returns:
        ``x``.
    """
    for k, idx in _groups(column, len(RANDAUGMENT)):
        row = RANDAUGMENT[k]
        if row.identity or isinstance(row.op, Geometric):
            continue
        dev_idx = idx.to(x.device)
        x.index_copy_(0, dev_idx, row.op.apply_(x.index_select(0, dev_idx), values[idx]))
    return x


def randaugment_(x: Tensor, params: RandAugmentParams, interpolation: str = "nearest") -> Tensor:
    """Apply each sample's RandAugment ops in order, in place: per op slot, the geometric ops, then the
    pixel ops (``geometric_slot_``, ``pixel_slot_``).

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255], contiguous; overwritten with the result.
        params: draws from ``sample_randaugment`` for these N samples.
        interpolation: 'nearest' or 'bilinear' for the geometric ops.

    Returns:
        ``x``.
    """
    for slot in range(params.ops.shape[1]):
        column, values = params.ops[:, slot], params.values[:, slot]
        pixel_slot_(geometric_slot_(x, column, values, interpolation), column, values)
    return x


@dataclass
class ColorJitterParams:
    """Per-sample ColorJitter draws (CPU tensors).

    Attributes:
        order: ``(N, 4)`` int64, a permutation of ``COLOR_JITTER_OPS`` indices per sample.
        factors: ``(N, 4)`` float64 brightness, contrast, saturation factors and hue shift.
        enabled: which of the four ops are on (torchvision skips an op whose range is degenerate).
    """

    order: Tensor
    factors: Tensor
    enabled: tuple[bool, bool, bool, bool]


def sample_color_jitter(
    n: int, brightness: float, contrast: float, saturation: float, hue: float, generator: torch.Generator
) -> ColorJitterParams:
    """Draw ``ColorJitter(brightness, contrast, saturation, hue)`` parameters for ``n`` samples.

    Factors are uniform in ``[max(0, 1 - v), 1 + v]`` (hue shift in ``[-hue, hue]``); each sample's op
    order is a uniform random permutation, as ``ColorJitter.get_params``.

    Args:
        n: number of samples.
        brightness, contrast, saturation: jitter strengths (0 = off).
        hue: hue jitter in [0, 0.5] (0 = off).
        generator: a generator; the draws are made on its device.

    Returns:
        ColorJitterParams.
    """
    dev = generator.device
    order = torch.argsort(torch.rand(n, 4, generator=generator, device=dev), dim=1)
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64, device=dev)
    # the ranges' ends as float32 numbers (torchvision's), combined per column with Python scalars: no copy
    # of a table to the device
    lows = np.array([max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast), max(0.0, 1.0 - saturation), -hue])
    lows = lows.astype(np.float32)
    spans = np.array([1.0 + brightness, 1.0 + contrast, 1.0 + saturation, hue], dtype=np.float32) - lows
    factors = torch.stack([float(lows[i]) + float(spans[i]) * u[:, i] for i in range(4)], dim=1)  # (n, 4)
    enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
    return ColorJitterParams(order=order, factors=factors, enabled=enabled)


def color_jitter_(x: Tensor, params: ColorJitterParams) -> Tensor:
    """Apply each sample's colour jitter in its own op order, in place.

    Brightness, contrast and saturation are all blends ``f * x + (1 - f) * D`` (D: black, the mean gray
    level, the gray image), so each of the four steps runs one blend over the whole batch with per-sample
    factors and per-sample choice of D (samples whose step is hue or a disabled op get ``f = 1`` and
    ``D = 0``, an exact no-op); the samples whose step is hue are then gathered and hue-shifted. Results
    equal torchvision's ops applied one by one. On a CPU the blend walks the batch in slices of
    ``_BLEND_ROWS`` samples so that its passes stay in cache; on a GPU it takes the batch at once.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255]; overwritten with the result.
        params: draws from ``sample_color_jitter`` for these N samples.

    Returns:
        ``x``.
    """
    if not any(params.enabled):
        return x
    n = x.shape[0]
    enabled = torch.tensor(params.enabled)
    rows = n if x.device.type != "cpu" else min(n, _BLEND_ROWS)
    gray = torch.empty(rows, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    for step in range(4):
        op = params.order[:, step]  # (N,)
        active = enabled[op]
        is_blend = active & (op < 3)
        if bool(is_blend.any()):
            ones = torch.ones(n, dtype=torch.float64)
            factor = torch.where(is_blend, params.factors[torch.arange(n), op], ones)
            keep = ops.per_sample(factor, x)  # f
            other = ops.complement(factor, x)  # float32(1 - f)
            use_mean = (is_blend & (op == 1)).to(x.dtype).to(x.device).view(n, 1, 1, 1)
            use_gray = (is_blend & (op == 2)).to(x.dtype).to(x.device).view(n, 1, 1, 1)
            for start in range(0, n, rows):  # a few samples at a time, so that the passes stay in cache
                part = slice(start, min(n, start + rows))
                xs = x[part]
                gs = ops.grayscale(xs, out=gray[: xs.shape[0]])
                mean = gs.mean(dim=(1, 2, 3), keepdim=True)  # (n, 1, 1, 1)
                # (1 - f) * D with D the gray image, its mean or black: exactly one term is kept per sample
                weighted = gs.mul_(use_gray[part] * other[part]).add_(
                    mean.mul_(other[part]).mul_(use_mean[part])
                )
                xs.mul_(keep[part]).add_(weighted).clamp_(0.0, 255.0).floor_()
        hue = (active & (op == 3)).nonzero().squeeze(1)
        if hue.numel():
            dev_idx = hue.to(x.device)
            x.index_copy_(0, dev_idx, ops.adjust_hue_(x.index_select(0, dev_idx), params.factors[hue, 3]))
    return x
