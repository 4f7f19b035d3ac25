"""Batched pixel and colour operations with torchvision's uint8 semantics.

Every function takes a batch ``x`` of shape ``(N, 3, H, W)``, dtype float32, holding whole numbers in
``[0, 255]`` (a uint8 image batch kept in float so that it can live on any device and feed ``grid_sample``),
plus one parameter per sample. Each reproduces the corresponding ``torchvision.transforms.functional`` op
on a uint8 tensor: the same float32 arithmetic, the same clamping, and the same cast back to uint8
(truncation for blends, rounding for the sharpness filter). None of them loops over samples: per-sample
parameters are broadcast as ``(N, 1, 1, 1)`` tensors and histograms are built for the whole batch at once.

Each op comes in two forms: ``op_(x, ...)`` (PyTorch's trailing underscore convention) overwrites ``x`` and
returns it, and is what the pipeline runs (on a CPU, fresh memory for every intermediate costs more than
the arithmetic, so the in-place forms keep temporaries few); ``op(x, ...)`` returns a new batch, the form
the parity tests compare with torchvision.

Per-sample factors may be float64: blends use ``float32(f)`` and ``float32(1 - f)`` computed in float64,
which is what torchvision does with a Python float factor. Masks are float 0/1 arithmetic on whole
numbers rather than boolean selections (exact, and several times faster on CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "adjust_brightness",
    "adjust_brightness_",
    "adjust_contrast",
    "adjust_contrast_",
    "adjust_hue",
    "adjust_hue_",
    "adjust_saturation",
    "adjust_saturation_",
    "adjust_sharpness",
    "adjust_sharpness_",
    "autocontrast",
    "autocontrast_",
    "autocontrast_bounds",
    "blend_",
    "blend_mean_",
    "complement",
    "equalize",
    "equalize_",
    "equalize_tables",
    "gray_mean",
    "grayscale",
    "lookup_",
    "per_sample",
    "posterize",
    "posterize_",
    "sharpness_degenerate",
    "solarize",
    "solarize_",
    "stretch_",
]


def per_sample(values: Tensor, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reshape per-sample values ``(N,)`` to ``(N, 1, 1, 1)`` on ``x``'s device."""
    return values.to(device=x.device, dtype=dtype).view(-1, 1, 1, 1)


def complement(ratio: Tensor, x: Tensor) -> Tensor:
    """``float32(1 - ratio)`` computed in float64, as ``(N, 1, 1, 1)`` on ``x``'s device."""
    return per_sample(1.0 - ratio.double(), x)


def grayscale(x: Tensor, out: Tensor | None = None) -> Tensor:
    """ITU-R 601 luma, truncated to whole numbers as torchvision's uint8 ``rgb_to_grayscale``.

    Args:
        x: ``(N, 3, H, W)`` float32 in [0, 255].
        out: optional ``(N, 1, H, W)`` float32 buffer for the result.

    Returns:
        ``(N, 1, H, W)`` float32 whole numbers.
    """
    r, g, b = x.unbind(dim=1)
    gray = torch.mul(r, 0.2989, out=None if out is None else out.squeeze(1))
    term = torch.mul(g, 0.587)
    gray.add_(term)
    gray.add_(torch.mul(b, 0.114, out=term))
    return gray.floor_().unsqueeze(1)


def _blend_(img1: Tensor, weighted2: Tensor, ratio: Tensor) -> Tensor:
    """In place: ``img1 = trunc(clamp(ratio * img1 + weighted2))``, ``weighted2 = (1 - ratio) * img2``."""
    return img1.mul_(per_sample(ratio, img1)).add_(weighted2).clamp_(0.0, 255.0).floor_()


def blend_(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """In place: torchvision's ``_blend`` of each image with its degenerate image,
    ``trunc(clamp(f * x + (1 - f) * degenerate))``.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255]; overwritten.
        degenerate: ``(N, 3 or 1, H, W)`` float32; overwritten (scaled by ``1 - f``).
        factor: ``(N,)`` f; 0 gives the degenerate image, 1 the original.

    Returns:
        ``x``.
    """
    return _blend_(x, degenerate.mul_(complement(factor, x)), factor)


def blend_mean_(x: Tensor, mean: Tensor, factor: Tensor) -> Tensor:
    """In place: blend each image with a per-sample level ``mean`` (N, 1, 1, 1) (contrast's degenerate);
    ``x`` may be any ``(N, ...)`` batch of levels, ``factor`` (N,)."""
    return _blend_(x, mean * complement(factor, x), factor)


def gray_mean(gray: Tensor) -> Tensor:
    """``(N, 1, 1, 1)`` float32 mean of each gray image ``(N, 1, H, W)`` (contrast's degenerate level)."""
    return gray.mean(dim=(1, 2, 3), keepdim=True)


def adjust_brightness_(x: Tensor, factor: Tensor) -> Tensor:
    """In place: scale intensities by ``factor`` (N,) (blend with black)."""
    return x.mul_(per_sample(factor, x)).clamp_(0.0, 255.0).floor_()


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scale intensities by ``factor`` (N,) (blend with black)."""
    return adjust_brightness_(x.clone(), factor)


def adjust_saturation_(x: Tensor, factor: Tensor) -> Tensor:
    """In place: blend with the grayscale image; ``factor`` (N,) 0 gives gray, 1 the original."""
    return _blend_(x, grayscale(x).mul_(complement(factor, x)), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its grayscale version; ``factor`` (N,) 0 gives gray, 1 the original."""
    return adjust_saturation_(x.clone(), factor)


def adjust_contrast_(x: Tensor, factor: Tensor) -> Tensor:
    """In place: blend with the mean of the (truncated) grayscale image; ``factor`` (N,)."""
    return blend_mean_(x, gray_mean(grayscale(x)), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its (truncated) grayscale version; ``factor`` (N,)."""
    return adjust_contrast_(x.clone(), factor)


def sharpness_degenerate(x: Tensor) -> Tensor | None:
    """torchvision's degenerate image of ``adjust_sharpness``: the interior smoothed by the kernel
    [[1,1,1],[1,5,1],[1,1,1]] / 13 and rounded, the border kept.

    The 3x3 filter is computed as (3x3 box sum + 4 * centre) / 13 with shifted slices instead of a
    convolution; the rounded result equals torchvision's (a sum of whole numbers over 13 is never within
    float error of a .5 tie).

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255].

    Returns:
        a new ``(N, 3, H, W)`` float32 batch, or None for images without an interior (H or W <= 2), which
        torchvision leaves as they are.
    """
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return None
    rows = x[:, :, :-2] + x[:, :, 1:-1]  # (N, 3, H-2, W)
    rows.add_(x[:, :, 2:])
    box = rows[..., :-2] + rows[..., 1:-1]  # (N, 3, H-2, W-2)
    box.add_(rows[..., 2:]).add_(x[:, :, 1:-1, 1:-1], alpha=4.0).div_(13.0).round_().clamp_(0.0, 255.0)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = box
    return degenerate


def adjust_sharpness_(x: Tensor, factor: Tensor) -> Tensor:
    """In place: blend with a smoothed copy (``sharpness_degenerate``; borders kept).

    Args:
        x: ``(N, 3, H, W)`` float32 in [0, 255]; overwritten.
        factor: ``(N,)``; 0 gives the smoothed image, 1 the original, 2 a sharpened one.

    Returns:
        ``x``.
    """
    degenerate = sharpness_degenerate(x)
    return x if degenerate is None else blend_(x, degenerate, factor)


def adjust_sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with a smoothed copy (see ``adjust_sharpness_``); ``factor`` (N,)."""
    return adjust_sharpness_(x.clone(), factor)


def posterize_(x: Tensor, bits: Tensor) -> Tensor:
    """In place: keep the ``bits`` (N,) most significant bits of each value (``img & -2**(8-bits)``)."""
    step = torch.pow(2.0, 8 - per_sample(bits, x, torch.float32))  # (N, 1, 1, 1)
    return x.div_(step).floor_().mul_(step)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the ``bits`` (N,) most significant bits of each channel value."""
    return posterize_(x.clone(), bits)


def solarize_(x: Tensor, threshold: Tensor) -> Tensor:
    """In place: invert every value ``>= threshold`` (N,)."""
    first = torch.ceil(per_sample(threshold, x))  # smallest whole value that is inverted
    inverted = (x - first).add_(1.0).clamp_(0.0, 1.0)  # 1.0 where x >= threshold
    return x.add_(inverted.mul_(x.mul(-2.0).add_(255.0)))


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert every value ``>= threshold`` (N,)."""
    return solarize_(x.clone(), threshold)


def autocontrast_bounds(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each channel's ``(low, scale)`` of ``autocontrast_``, ``(N, 3, 1, 1)`` float32 each: its minimum and
    ``255 / (max - min)`` (0 and 1 for a constant channel, which stays as it is)."""
    lo = x.amin(dim=(2, 3), keepdim=True)  # (N, 3, 1, 1)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo)
    flat = ~torch.isfinite(scale)
    return lo.masked_fill(flat, 0.0), scale.masked_fill(flat, 1.0)


def stretch_(x: Tensor, low: Tensor, scale: Tensor) -> Tensor:
    """In place: ``trunc(clamp((x - low) * scale))`` per sample and channel (``autocontrast_bounds``); ``x``
    may be any ``(N, 3, ...)`` batch of levels."""
    return x.sub_(low).mul_(scale).clamp_(0.0, 255.0).floor_()


def autocontrast_(x: Tensor) -> Tensor:
    """In place: stretch each channel of each image to [0, 255] (constant channels unchanged).

    Args:
        x: ``(N, 3, H, W)`` float32 in [0, 255]; overwritten.

    Returns:
        ``x``.
    """
    return stretch_(x, *autocontrast_bounds(x))


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each image to [0, 255] (constant channels are left unchanged)."""
    return autocontrast_(x.clone())


def _histogram_bins(x: Tensor, values: Tensor) -> Tensor:
    """``(N*3*H*W,)`` int64: each value's bin in the ``N*3`` flattened 256-bin histograms of ``x``'s channels;
    ``values`` is ``x`` as int64 ``(N*3, H*W)``."""
    offsets = torch.arange(values.shape[0], device=x.device).mul_(256).unsqueeze(1)  # (N*3, 1)
    return (values + offsets).view(-1)


def _equalize_lut(x: Tensor, values: Tensor, flat: Tensor, sync_free: bool = False) -> Tensor:
    """``(N*3, 256)`` float32 look-up tables of ``equalize_`` from the values and bins of ``x``'s channels;
    the histograms by ``bincount`` on a CPU (faster there) unless ``sync_free``, else by ``scatter_add_``
    (``bincount`` waits for a GPU)."""
    n, c, h, w = x.shape
    if x.device.type == "cpu" and not sync_free:
        hist = torch.bincount(flat, minlength=n * c * 256)
    else:
        ones = torch.ones(1, dtype=torch.int64, device=x.device).expand(flat.numel())
        hist = torch.zeros(n * c * 256, dtype=torch.int64, device=x.device).scatter_add_(0, flat, ones)
    hist = hist.view(n * c, 256)  # (N*3, 256)
    top = hist.gather(1, values.amax(dim=1, keepdim=True))  # (N*3, 1): count of the last non-empty bin
    step = torch.div(h * w - top, 255, rounding_mode="floor")  # (N*3, 1)
    safe = step.clamp(min=1)
    lut = torch.div(hist.cumsum(1) + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor")
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], dim=1).clamp_(0, 255)  # (N*3, 256)
    identity = torch.arange(256, device=x.device).expand_as(lut)
    return torch.where(step == 0, identity, lut).to(x.dtype)  # channels with step 0 stay unchanged


def equalize_tables(x: Tensor, values: Tensor | None = None, sync_free: bool = False) -> Tensor:
    """The look-up table of ``equalize_`` for each channel of each image.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255].
        values: ``x`` as int64 ``(N, 3, H*W)`` where the caller has it.
        sync_free: count with ops that never wait for the device, on a CPU too.

    Returns:
        ``(N, 3, 256)`` float32 whole numbers.
    """
    n, c, h, w = x.shape
    values = (x.reshape(n, c, h * w).to(torch.int64) if values is None else values).view(n * c, h * w)
    return _equalize_lut(x, values, _histogram_bins(x, values), sync_free).view(n, c, 256)


def lookup_(x: Tensor, tables: Tensor, values: Tensor | None = None) -> Tensor:
    """In place: map each value of each channel through its table.

    Args:
        x: ``(N, 3, ...)`` contiguous float32 whole numbers in [0, 255] (images, or the 256 levels);
            overwritten.
        tables: ``(N, 3, 256)`` float32.
        values: ``x`` as int64 ``(N, 3, L)`` where the caller has it.

    Returns:
        ``x``.
    """
    n, c = x.shape[:2]
    flat = x.view(n, c, -1)
    index = flat.to(torch.int64) if values is None else values
    return torch.gather(tables, 2, index, out=flat).view_as(x)


def equalize_(x: Tensor) -> Tensor:
    """In place: histogram equalisation of each channel of each image (torchvision's uint8 ``equalize``).

    All ``N * 3`` histograms come from one ``scatter_add_`` (a ``bincount`` on a CPU) on offset bin
    indices; the look-up table is a cumulative sum (no sort: the last non-empty bin of a channel is the
    bin of its maximum value).

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255], contiguous; overwritten.

    Returns:
        ``x``.
    """
    n, c, h, w = x.shape
    values = x.reshape(n * c, h * w).to(torch.int64)  # (N*3, H*W)
    flat = _histogram_bins(x, values)  # (N*3*H*W,) bin of each value in the flattened histograms
    torch.index_select(_equalize_lut(x, values, flat).view(-1), 0, flat, out=x.view(-1))
    return x


def equalize(x: Tensor) -> Tensor:
    """Histogram equalisation of each channel of each image, as torchvision's uint8 ``equalize``."""
    return equalize_(x.contiguous().clone())


def adjust_hue_(x: Tensor, factor: Tensor) -> Tensor:
    """In place: rotate the hue of each image by ``factor`` (N,) turns in [-0.5, 0.5], via HSV.

    Reproduces torchvision's tensor path bit for bit (``_rgb2hsv``, shift, ``_hsv2rgb``, then
    ``x * 255.999`` truncated): the same float32 expressions for the hue, ``s``, ``v`` and the recomputed
    value ``q`` or ``t``, but arranged to do little work. A hue rotation keeps each pixel's maximum and
    minimum channel values (they come back unchanged after truncation), so only the middle value is
    recomputed, and the three values are routed to R, G, B by the new hue sector. Boolean masks are
    replaced by 0/1 float arithmetic on whole numbers, selections by ``lerp`` with 0/1 weights (both
    exact), and every intermediate lives in one workspace.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255], contiguous; overwritten.
        factor: ``(N,)`` hue shifts.

    Returns:
        ``x``.
    """
    n, _, h, w = x.shape
    red, green, blue = x.unbind(dim=1)  # (N, H, W) views
    ws = torch.empty(9, n, h, w, dtype=x.dtype, device=x.device)  # workspace planes
    vmax = torch.maximum(red, green, out=ws[0])
    torch.maximum(vmax, blue, out=vmax)
    vmin = torch.minimum(red, green, out=ws[1])
    torch.minimum(vmin, blue, out=vmin)
    # _rgb2hsv of x / 255
    maxc = torch.div(vmax, 255.0, out=ws[2])
    cr = torch.div(vmin, 255.0, out=ws[3])
    torch.sub(maxc, cr, out=cr)  # maxc - minc
    eq = torch.sub(vmin, vmax, out=ws[4]).add_(1.0).clamp_(min=0.0)  # 1.0 where maxc == minc
    sat = torch.maximum(maxc, eq, out=ws[5])
    torch.div(cr, sat, out=sat)  # s = cr / (maxc, or 1 where maxc == minc)
    cr.add_(eq)  # cr_divisor
    rc = torch.div(red, 255.0, out=ws[4])
    torch.sub(maxc, rc, out=rc).div_(cr)
    gc = torch.div(green, 255.0, out=ws[6])
    torch.sub(maxc, gc, out=gc).div_(cr)
    bc = torch.div(blue, 255.0, out=ws[7])
    torch.sub(maxc, bc, out=bc).div_(cr)
    hr = torch.sub(bc, gc, out=ws[3])  # bc - gc
    hg = torch.add(rc, 2.0, out=ws[8]).sub_(bc)  # 2 + rc - bc
    hb = torch.add(gc, 4.0, out=ws[7]).sub_(rc)  # 4 + gc - rc
    is_g = torch.sub(green, vmax, out=ws[6]).add_(1.0).clamp_(min=0.0)  # 1.0 where maxc == g
    hue = torch.lerp(hb, hg, is_g, out=ws[8])
    is_r = torch.sub(red, vmax, out=ws[6]).add_(1.0).clamp_(min=0.0)  # 1.0 where maxc == r
    torch.lerp(hue, hr, is_r, out=hue)  # r first, then g, then b, as torchvision's masks
    floor = ws[3]
    hue.div_(6.0).add_(1.0)
    hue.sub_(torch.floor(hue, out=floor))  # fmod(h / 6 + 1, 1)
    hue.add_(per_sample(factor, x).view(n, 1, 1))
    hue.sub_(torch.floor(hue, out=floor))  # (h + factor) % 1
    # _hsv2rgb, middle value only; a hue that rounds up to 1.0 lands in sector 5 with f = 1, which gives
    # the same pixel as torchvision's sector 0 with f = 0
    hue.mul_(6.0)
    sector = torch.floor(hue, out=ws[3]).clamp_(max=5.0)
    frac = hue.sub_(sector)
    odd = torch.mul(sector, 0.5, out=ws[7]).floor_().mul_(2.0)
    torch.sub(sector, odd, out=odd)  # 1.0 in odd sectors (q = v (1 - s f)), 0.0 in even ones (t)
    arg = torch.neg(frac, out=ws[4]).add_(1.0)
    torch.lerp(arg, frac, odd, out=arg)
    mid = arg.mul_(sat).neg_().add_(1.0).mul_(maxc).clamp_(0.0, 1.0).mul_(255.999).floor_()
    # route: red takes the max in sectors 0 and 5, the middle value in 1 and 4, the min in 2 and 3, i.e. by
    # the distance of the sector from 2.5 (2.5 max, 1.5 middle, 0.5 min); green and blue likewise by the
    # circular distance from 4.5 and 0.5
    centres = torch.empty(
        1, 3, 1, 1, dtype=x.dtype, device=x.device
    )  # filled in place: no copy from the host
    for channel, centre in enumerate((2.5, 4.5, 0.5)):
        centres[:, channel].fill_(centre)
    temp = ws[6:9].permute(1, 0, 2, 3)  # (N, 3, H, W) view of three free planes
    rank = torch.sub(sector.unsqueeze(1), centres, out=x).abs_()  # the input is no longer needed
    torch.minimum(rank, torch.neg(rank, out=temp).add_(6.0), out=rank)
    rank.sub_(0.5)  # 0 min, 1 middle, 2 max
    low = torch.clamp(rank, 0.0, 1.0, out=temp)
    torch.lerp(vmin.unsqueeze(1), mid.unsqueeze(1), low, out=low)  # min or middle value
    torch.lerp(low, vmax.unsqueeze(1), rank.sub_(1.0).clamp_(0.0, 1.0), out=x)  # or max
    return x


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue of each image by ``factor`` (N,) turns in [-0.5, 0.5] (see ``adjust_hue_``)."""
    return adjust_hue_(x.clone(), factor)
