"""Batched pixel and colour operations with torchvision's uint8 semantics.

Every function takes a batch ``x`` of shape ``(N, 3, H, W)``, dtype float32, holding whole numbers in
``[0, 255]`` (a uint8 image batch kept in float so that it can live on any device and feed ``grid_sample``),
plus one parameter per sample, and returns a new batch of the same kind. Each function reproduces the
corresponding ``torchvision.transforms.functional`` op on a uint8 tensor: the same float32 arithmetic, the
same clamping, and the same cast back to uint8 (truncation for blends, rounding for the sharpness filter).
None of them loops over samples: per-sample parameters are broadcast as ``(N, 1, 1, 1)`` tensors and
histograms are built for the whole batch at once.

Per-sample factors may be float64: blends use ``float32(f)`` and ``float32(1 - f)`` computed in float64,
which is what torchvision does with a Python float factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "adjust_sharpness",
    "autocontrast",
    "blend",
    "equalize",
    "grayscale",
    "posterize",
    "solarize",
]


def _per_sample(values: Tensor, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reshape per-sample values ``(N,)`` to ``(N, 1, 1, 1)`` on ``x``'s device."""
    return values.to(device=x.device, dtype=dtype).view(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601 luma, truncated to whole numbers as torchvision's uint8 ``rgb_to_grayscale``.

    Args:
        x: ``(N, 3, H, W)`` float32 in [0, 255].

    Returns:
        ``(N, 1, H, W)`` float32 whole numbers.
    """
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).floor_().unsqueeze(1)


def blend(img1: Tensor, img2: Tensor, ratio: Tensor) -> Tensor:
    """``ratio * img1 + (1 - ratio) * img2``, clamped to [0, 255] and truncated (torchvision ``_blend``).

    Args:
        img1: ``(N, 3, H, W)`` float32 in [0, 255].
        img2: anything broadcastable to ``img1`` (``(N, 1, H, W)``, ``(N, 1, 1, 1)``, ...).
        ratio: ``(N,)`` blend factors (float64 for bit-exact agreement with torchvision).

    Returns:
        ``(N, 3, H, W)`` float32 whole numbers.
    """
    r = _per_sample(ratio, img1)
    r1 = _per_sample(1.0 - ratio.double(), img1)
    return (img1 * r).add_(img2 * r1).clamp_(0.0, 255.0).floor_()


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scale intensities by ``factor`` (N,) (blend with black)."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 255.0).floor_()


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its grayscale version; ``factor`` (N,) 0 gives gray, 1 the original."""
    return blend(x, grayscale(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its (truncated) grayscale version; ``factor`` (N,)."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return blend(x, mean, factor)


def adjust_sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with a smoothed copy (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; borders kept).

    The 3x3 filter is computed as (3x3 box sum + 4 * centre) / 13 with shifted slices instead of a
    convolution; the rounded result equals torchvision's (a sum of whole numbers over 13 is never within
    float error of a .5 tie).

    Args:
        x: ``(N, 3, H, W)`` float32 in [0, 255].
        factor: ``(N,)``; 0 gives the smoothed image, 1 the original, 2 a sharpened one.

    Returns:
        ``(N, 3, H, W)`` float32 whole numbers.
    """
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x.clone()
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # (N, 3, H-2, W)
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # (N, 3, H-2, W-2)
    smooth = box.add_(x[:, :, 1:-1, 1:-1], alpha=4.0).div_(13.0).round_().clamp_(0.0, 255.0)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return blend(x, degenerate, factor)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the ``bits`` (N,) most significant bits of each channel value (``img & -2**(8-bits)``)."""
    step = torch.pow(2.0, 8 - _per_sample(bits, x, torch.float32))  # (N, 1, 1, 1)
    return torch.floor(x / step).mul_(step)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert every value ``>= threshold`` (N,)."""
    return torch.where(x >= _per_sample(threshold, x), 255.0 - x, x)


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each image to [0, 255] (constant channels are left unchanged).

    Args:
        x: ``(N, 3, H, W)`` float32 in [0, 255].

    Returns:
        ``(N, 3, H, W)`` float32 whole numbers.
    """
    lo = x.amin(dim=(2, 3), keepdim=True)  # (N, 3, 1, 1)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo)
    flat = ~torch.isfinite(scale)
    lo = lo.masked_fill(flat, 0.0)
    scale = scale.masked_fill(flat, 1.0)
    return ((x - lo) * scale).clamp_(0.0, 255.0).floor_()


def equalize(x: Tensor) -> Tensor:
    """Histogram equalisation of each channel of each image, as torchvision's uint8 ``equalize``.

    All ``N * 3`` histograms come from one ``scatter_add_`` on offset bin indices; the look-up table is a
    cumulative sum (no sort: the last non-empty bin of a channel is the bin of its maximum value).

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255].

    Returns:
        ``(N, 3, H, W)`` float32 whole numbers.
    """
    n, c, h, w = x.shape
    values = x.reshape(n * c, h * w).to(torch.int64)  # (N*3, H*W)
    offsets = torch.arange(n * c, device=x.device).mul_(256).unsqueeze(1)  # (N*3, 1)
    ones = torch.ones(1, dtype=torch.int64, device=x.device).expand(values.numel())
    hist = torch.zeros(n * c * 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(0, (values + offsets).view(-1), ones)
    hist = hist.view(n * c, 256)  # (N*3, 256)
    top = hist.gather(1, values.amax(dim=1, keepdim=True))  # (N*3, 1): count of the last non-empty bin
    step = torch.div(h * w - top, 255, rounding_mode="floor")  # (N*3, 1)
    safe = step.clamp(min=1)
    lut = torch.div(hist.cumsum(1) + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor")
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], dim=1).clamp_(0, 255)  # (N*3, 256)
    out = torch.where(step == 0, values, lut.gather(1, values))  # (N*3, H*W)
    return out.view(n, c, h, w).to(x.dtype)


# hue: which of (max, mid, min) each output channel takes in each of the six hue sectors
_SECTOR_ROLES = ((2, 1, 0, 0, 1, 2), (1, 2, 2, 1, 0, 0), (0, 0, 1, 2, 2, 1))  # [channel][sector]; 2=max 0=min


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue of each image by ``factor`` (N,) turns in [-0.5, 0.5], via HSV.

    Follows torchvision's tensor path (``_rgb2hsv``, shift, ``_hsv2rgb``, then ``x * 255.999`` truncated)
    with the same float32 expressions, but only evaluates what changes: a hue rotation keeps each pixel's
    maximum and minimum channel values (they come back unchanged after truncation), so only the middle
    value is recomputed (``q`` or ``t`` of ``_hsv2rgb``) and the three values are routed to R, G, B by the
    new hue sector.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255].
        factor: ``(N,)`` hue shifts.

    Returns:
        ``(N, 3, H, W)`` float32 whole numbers.
    """
    img = x / 255.0
    r, g, b = img.unbind(dim=1)  # (N, H, W) each
    maxc = img.amax(dim=1)
    minc = img.amin(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + _per_sample(factor, x).view(-1, 1, 1), 1.0)

    h6 = h * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = sector.to(torch.int64) % 6  # (N, H, W)
    odd = (sector % 2) == 1  # q = v (1 - s f) in odd sectors, t = v (1 - s (1 - f)) in even ones
    mid = (maxc * (1.0 - s * torch.where(odd, frac, 1.0 - frac))).clamp_(0.0, 1.0).mul_(255.999).floor_()

    roles = torch.tensor(_SECTOR_ROLES, dtype=torch.int64, device=x.device)  # (3, 6)
    role = roles[:, sector]  # (3, N, H, W)
    vmax = x.amax(dim=1)
    vmin = x.amin(dim=1)
    out = torch.where(role == 2, vmax, torch.where(role == 0, vmin, mid))  # (3, N, H, W)
    return out.transpose(0, 1).contiguous()  # (N, 3, H, W)
