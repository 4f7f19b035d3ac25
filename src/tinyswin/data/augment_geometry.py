"""Batched geometric operations: random resized crop, padded random crop, flip, resize, affine warps.

Images are ``(N, 3, H, W)`` float32 batches of whole numbers in [0, 255] (uint8 semantics). Every function
works on the whole batch with per-sample parameters; random parameters are drawn on the CPU with a
``torch.Generator`` (``sample_*`` functions) and applied on any device (``resized_crop``, ``pad_crop``,
``warp_affine``).

How the results relate to torchvision's uint8 tensor ops (``torchvision.transforms.functional``):

- ``resized_crop`` equals ``resized_crop(..., antialias=True)`` followed by ``hflip`` where chosen. When no
  sample shrinks and the interpolation is bilinear (the 64px recipes: crops of at most 64 pixels resized to
  64), it runs as one ``grid_sample`` with source coordinates clamped to each crop, the same taps and
  weights as torchvision's resize; otherwise (bicubic, or a crop larger than the output) it applies
  torchvision's antialiased separable filter exactly, as two batched matrix products with per-sample
  weight matrices. Either way the result is rounded like torchvision's cast back to uint8; float rounding
  of the weights can move a value that lies on a .5 tie by one level.
- ``warp_affine`` with the matrices of ``affine_from_codes`` equals torchvision's ``affine`` / ``rotate``
  on tensors (same grid, same ``grid_sample``, fill 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AFFINE_PARAMS",
    "CropBoxes",
    "affine_from_codes",
    "affine_grid_parts",
    "crop_source_coords",
    "pad_crop",
    "resize",
    "resized_crop",
    "sample_box_sides",
    "sample_pad_crop",
    "sample_resized_crop",
    "translate_",
    "upsamples_exactly",
    "warp_affine",
]


@dataclass
class CropBoxes:
    """Per-sample crop boxes, int64 CPU tensors of shape ``(N,)``: ``top``, ``left``, ``height``, ``width``.

    For a padded crop, ``top`` and ``left`` are in padded coordinates and may exceed the image.
    """

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor


def _randint(high: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform integers in ``[0, high)`` (elementwise ``high`` (N,) int64 >= 1), like ``torch.randint``."""
    u = torch.rand(high.shape, generator=generator, dtype=torch.float64, device=high.device)
    return torch.minimum((u * high).floor().to(torch.int64), high - 1)


def sample_box_sides(
    n: int,
    area: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Box sides of ``attempts`` tries for ``n`` samples, as torchvision's RandomResizedCrop and RandomErasing
    draw them: a box area uniform in ``scale * area`` and an aspect log-uniform in ``ratio``.

    Args:
        n: number of samples.
        area: the image's area in pixels.
        scale: range of the box area as a fraction of ``area``.
        ratio: range of the aspect ratio, sampled log-uniformly.
        attempts: tries per sample.
        generator: a generator; the draws are made on its device.

    Returns:
        ``(along, across)``: int64 ``(n, attempts)`` sides ``round(sqrt(box * aspect))`` and
        ``round(sqrt(box / aspect))`` (the crop's width and height, the erased box's height and width).
    """
    dev = generator.device
    target = float(area) * (
        scale[0]
        + (scale[1] - scale[0])
        * torch.rand(n, attempts, generator=generator, dtype=torch.float64, device=dev)
    )
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    u = torch.rand(n, attempts, generator=generator, dtype=torch.float64, device=dev)
    aspect = torch.exp(lo + (hi - lo) * u)
    along = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
    return along, torch.round(torch.sqrt(target / aspect)).to(torch.int64)


def sample_resized_crop(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> CropBoxes:
    """Crop boxes drawn as ``torchvision.transforms.RandomResizedCrop.get_params``, for ``n`` samples at once.

    Each sample tries ``attempts`` (area fraction, log-aspect) pairs and keeps the first that fits; samples
    where none fits fall back to the central crop clamped to the ratio range, as torchvision does.

    Args:
        n: number of samples.
        height, width: source image size.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        generator: a generator; the boxes are drawn on its device.
        attempts: tries per sample.

    Returns:
        CropBoxes with int64 tensors of shape ``(n,)`` on the generator's device.
    """
    w, h = sample_box_sides(n, height * width, scale, ratio, attempts, generator)  # (n, attempts) each
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.int64).argmax(dim=1, keepdim=True)  # (n, 1): first fitting attempt
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    top = _randint(height - h + 1, generator)
    left = _randint(width - w + 1, generator)
    top = torch.where(found, top, (height - fh) // 2)
    left = torch.where(found, left, (width - fw) // 2)
    return CropBoxes(top=top, left=left, height=h, width=w)


def sample_pad_crop(
    n: int, height: int, width: int, out_hw: tuple[int, int], padding: int, generator: torch.Generator
) -> CropBoxes:
    """Offsets of ``RandomCrop(out_hw, padding=padding)`` (zero padding) for ``n`` samples.

    Args:
        n: number of samples.
        height, width: image size before padding.
        out_hw: crop size; at most the padded size.
        padding: pixels of zero padding on every side.
        generator: CPU generator.

    Returns:
        CropBoxes in padded coordinates, each of size ``out_hw``.
    """
    oh, ow = out_hw
    ph, pw = height + 2 * padding, width + 2 * padding
    if oh > ph or ow > pw:
        raise ValueError(f"crop size {out_hw} is larger than the padded image ({ph}, {pw})")
    dev = generator.device
    top = _randint(torch.full((n,), ph - oh + 1, dtype=torch.int64, device=dev), generator)
    left = _randint(torch.full((n,), pw - ow + 1, dtype=torch.int64, device=dev), generator)
    full = torch.full((n,), oh, device=dev), torch.full((n,), ow, device=dev)
    return CropBoxes(top=top, left=left, height=full[0], width=full[1])


def _filter(d: Tensor, interpolation: str) -> Tensor:
    """Interpolation kernel of torchvision's antialiased resize (triangle, or cubic with a = -0.5)."""
    d = d.abs()
    if interpolation == "bilinear":
        return (1.0 - d).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = (((d - 5.0) * d + 8.0) * d - 4.0) * a
    return torch.where(d < 1.0, near, torch.where(d < 2.0, far, torch.zeros_like(d)))


def _resample_weights(
    start: Tensor,
    length: Tensor,
    in_size: int,
    out_size: int,
    interpolation: str,
    flip: Tensor | None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Per-sample 1-D antialiased resampling matrices of a crop, as PyTorch's ``antialias=True`` kernels.

    Args:
        start: ``(N,)`` first source index of the crop (the crop lies inside the image).
        length: ``(N,)`` crop length.
        in_size: full source length.
        out_size: output length.
        interpolation: 'bilinear' or 'bicubic'.
        flip: ``(N,)`` bool; reverse the output axis where True.
        device: where to build the matrices (float64 arithmetic on every device).

    Returns:
        ``(N, out_size, in_size)`` float32 weights on ``device``, rows summing to 1 over the crop.
    """
    start, length = start.to(device), length.to(device)
    half = 1.0 if interpolation == "bilinear" else 2.0
    scale = (length.double() / out_size).unsqueeze(1)  # (N, 1)
    support = torch.where(scale >= 1.0, half * scale, torch.full_like(scale, half))
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5)  # (N, out)
    lo = torch.trunc(center - support + 0.5).clamp(min=0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length.double().unsqueeze(1))
    rel = torch.arange(in_size, dtype=torch.float64, device=device) - start.double().unsqueeze(1)  # (N, in)
    rel = rel.unsqueeze(1)  # (N, 1, in)
    weights = _filter(
        (rel - center.unsqueeze(2) + 0.5) * invscale.unsqueeze(2), interpolation
    )  # (N, out, in)
    weights = weights * ((rel >= lo.unsqueeze(2)) & (rel < hi.unsqueeze(2)))
    weights = weights / weights.sum(dim=2, keepdim=True).clamp(min=1e-12)
    if flip is not None:
        weights = torch.where(flip.to(device).view(-1, 1, 1), weights.flip(1), weights)
    return weights.to(torch.float32)


def crop_source_coords(boxes: CropBoxes, flip: Tensor, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Source coordinates of a bilinear, non-shrinking resized crop, as torchvision's resize samples them.

    Output pixel ``i`` of an axis reads source position ``(i + 0.5) * length / out - 0.5``, clamped to the
    crop (the antialiased kernel drops taps outside it) and offset by the crop's start; flipped samples read
    their columns in reverse.

    Args:
        boxes: CPU crop boxes, ``(N,)`` each.
        flip: ``(N,)`` bool CPU tensor.
        out_hw: output (height, width).

    Returns:
        ``(ys, xs)``: float64 CPU ``(N, oh)`` rows and ``(N, ow)`` columns in source pixel units.
    """
    coords = []
    for start, length, out, rev in (
        (boxes.top, boxes.height, out_hw[0], None),
        (boxes.left, boxes.width, out_hw[1], flip),
    ):
        idx = torch.arange(out, dtype=torch.float64, device=start.device).expand(len(start), out)  # (N, out)
        if rev is not None:
            idx = torch.where(rev.unsqueeze(1), out - 1 - idx, idx)
        src = (idx + 0.5) * (length.double() / out).unsqueeze(1) - 0.5
        src = torch.minimum(src.clamp(min=0.0), (length - 1).double().unsqueeze(1))  # inside the crop
        coords.append(src + start.unsqueeze(1))
    return coords[0], coords[1]


def _clamped_grid(
    boxes: CropBoxes, flip: Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int], device: torch.device
) -> Tensor:
    """Sampling grid of a bilinear, non-shrinking resized crop: ``(N, oh, ow, 2)`` float32 on ``device``.

    The per-sample x and y coordinates (``(N, ow)`` and ``(N, oh)``) are computed on the CPU in float64;
    only they travel to the device, where the grid is expanded.
    """
    ys, xs = crop_source_coords(boxes, flip, out_hw)
    gx = ((2.0 * xs + 1.0) / in_hw[1] - 1.0).to(dtype=torch.float32).to(device)  # (N, ow)
    gy = ((2.0 * ys + 1.0) / in_hw[0] - 1.0).to(dtype=torch.float32).to(device)  # (N, oh)
    n, (oh, ow) = len(gx), out_hw
    return torch.stack([gx.unsqueeze(1).expand(n, oh, ow), gy.unsqueeze(2).expand(n, oh, ow)], dim=3)


def upsamples_exactly(boxes: CropBoxes, out_hw: tuple[int, int], interpolation: str) -> bool:
    """True when a resized crop is bilinear, enlarges (or keeps) every box, and the output sides are powers of
    two up to 64: then every interpolated value is a dyadic rational that float32 holds exactly (torchvision's
    result, the grid path's and the native kernel's are the same whole number after rounding).
    """
    pow2 = all(0 < side <= 64 and side & (side - 1) == 0 for side in out_hw)
    return (
        interpolation == "bilinear"
        and pow2
        and not bool((boxes.height > out_hw[0]).any() or (boxes.width > out_hw[1]).any())
    )


def resized_crop(
    x: Tensor, boxes: CropBoxes, flip: Tensor, out_hw: tuple[int, int], interpolation: str = "bilinear"
) -> Tensor:
    """Crop each sample's box, resize it to ``out_hw`` and mirror it where ``flip``.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255].
        boxes: CPU crop boxes, ``(N,)`` each (inside the image).
        flip: ``(N,)`` bool CPU tensor.
        out_hw: output (height, width).
        interpolation: 'bilinear' or 'bicubic'.

    Returns:
        ``(N, 3, oh, ow)`` float32 whole numbers in [0, 255].
    """
    h, w = x.shape[-2:]
    oh, ow = out_hw
    shrinks = bool((boxes.height > oh).any() or (boxes.width > ow).any())
    if interpolation == "bilinear" and not shrinks:
        grid = _clamped_grid(boxes, flip, (h, w), out_hw, x.device)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.round_()  # bilinear weights are convex: no clamping needed
    wy = _resample_weights(boxes.top, boxes.height, h, oh, interpolation, None, x.device)  # (N, oh, H)
    wx = _resample_weights(boxes.left, boxes.width, w, ow, interpolation, flip, x.device)  # (N, ow, W)
    out = torch.matmul(torch.matmul(wy.unsqueeze(1), x), wx.transpose(1, 2).unsqueeze(1))  # (N, 3, oh, ow)
    return out.clamp_(0.0, 255.0).round_()


def pad_crop(x: Tensor, boxes: CropBoxes, flip: Tensor, padding: int) -> Tensor:
    """``RandomCrop(size, padding)`` with zero fill, then mirror where ``flip``; whole batch by gathers.

    Args:
        x: ``(N, 3, H, W)`` float32.
        boxes: CPU boxes from ``sample_pad_crop`` (padded coordinates, all the same size).
        flip: ``(N,)`` bool CPU tensor.
        padding: zero padding used when drawing the boxes.

    Returns:
        ``(N, 3, oh, ow)`` float32.
    """
    n, c, _, w = x.shape
    oh, ow = int(boxes.height[0]), int(boxes.width[0])
    padded = F.pad(x, (padding, padding, padding, padding))  # (N, 3, H+2p, W+2p)
    rows = boxes.top.unsqueeze(1) + torch.arange(oh)  # (N, oh)
    cols = torch.arange(ow).expand(n, ow)
    cols = torch.where(flip.unsqueeze(1), ow - 1 - cols, cols) + boxes.left.unsqueeze(1)  # (N, ow)
    rows = rows.to(x.device).view(n, 1, oh, 1).expand(n, c, oh, w + 2 * padding)
    cols = cols.to(x.device).view(n, 1, 1, ow).expand(n, c, oh, ow)
    return padded.gather(2, rows).gather(3, cols)


def resize(x: Tensor, out_hw: tuple[int, int], interpolation: str = "bilinear") -> Tensor:
    """Resize a whole batch (torchvision ``resize`` on uint8: antialiased, rounded).

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255].
        out_hw: output (height, width).
        interpolation: 'bilinear' or 'bicubic'.

    Returns:
        ``(N, 3, oh, ow)`` float32 whole numbers (``x`` itself when the size already matches).
    """
    if tuple(x.shape[-2:]) == tuple(out_hw):
        return x
    out = F.interpolate(x, size=out_hw, mode=interpolation, align_corners=False, antialias=True)
    return out.clamp_(0.0, 255.0).round_()


# the parameters of torchvision's affine transform that a geometric RandAugment op sets, one per op
AFFINE_PARAMS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def affine_from_codes(code: Tensor, magnitude: Tensor, height: int, width: int) -> Tensor:
    """Inverse affine matrices of RandAugment's geometric ops, as torchvision builds them for tensors, on the
    tensors' device.

    Args:
        code: ``(N,)`` int64: the parameter each sample's op sets, an index into ``AFFINE_PARAMS``; any other
            code (e.g. ``len(AFFINE_PARAMS)``) gives the identity matrix.
        magnitude: ``(N,)`` signed magnitudes as passed to torchvision's ``_apply_op`` (shear factor,
            pixels, or degrees).
        height, width: image size.

    Returns:
        ``(N, 2, 3)`` float32 matrices on ``code``'s device, mapping centred output pixel coordinates to
        input coordinates.
    """
    m = magnitude.double()
    zero = torch.zeros_like(m)
    shear = torch.rad2deg(torch.atan(m))
    shx, shy = torch.where(code == 0, shear, zero), torch.where(code == 1, shear, zero)
    tx, ty = torch.where(code == 2, torch.trunc(m), zero), torch.where(code == 3, torch.trunc(m), zero)
    angle = torch.where(code == 4, -m, zero)
    sheared = (code <= 1).double()
    cx, cy = sheared * (-width * 0.5), sheared * (-height * 0.5)  # shears use centre [0, 0] (top left)
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shx), torch.deg2rad(shy)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3).to(torch.float32)


def affine_grid_parts(theta: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """The factors of torchvision's affine sampling grid: ``grid[n, i, j] = (xs[j] * m[n, 0] + m[n, 2]) +
    ys[i] * m[n, 1]``.

    Args:
        theta: ``(N, 2, 3)`` float32 inverse matrices.
        h, w: image size.

    Returns:
        ``(m, xs, ys)``: ``(N, 3, 2)`` rescaled matrices ``theta^T / (w / 2, h / 2)``, the ``(W,)`` and
        ``(H,)`` pixel-centre coordinates relative to the image centre (float32, on ``theta``'s device).
    """
    half = torch.empty(2, dtype=torch.float32, device=theta.device)  # filled in place: no copy from the host
    half[0].fill_(0.5 * w)
    half[1].fill_(0.5 * h)
    rescaled = theta.transpose(1, 2) / half  # (N, 3, 2)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=theta.device)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=theta.device)
    return rescaled, xs, ys


def _affine_grid(theta: Tensor, h: int, w: int) -> Tensor:
    """torchvision's sampling grid for inverse matrices ``theta`` (N, 2, 3): ``(N, H, W, 2)`` float32."""
    n = theta.shape[0]
    rescaled, xs, ys = affine_grid_parts(theta, h, w)
    xs, ys = xs.view(1, 1, w, 1), ys.view(1, h, 1, 1)
    row_x = xs * rescaled[:, 0].view(n, 1, 1, 2)  # (N, 1, W, 2)
    row_x.add_(rescaled[:, 2].view(n, 1, 1, 2))
    return row_x + ys * rescaled[:, 1].view(n, 1, 1, 2)  # (N, H, W, 2)


def warp_affine(x: Tensor, theta: Tensor, interpolation: str = "nearest") -> Tensor:
    """Warp each sample by its inverse affine matrix, fill 0 (torchvision's tensor ``affine``).

    The sampling grid is torchvision's (pixel centres relative to the image centre, mapped by ``theta``
    and divided by half the image size), computed by broadcasting instead of a batched matrix product
    and only once per distinct matrix; the two can differ in the last bit, which moves a
    nearest-neighbour sample only on an exact tie.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255].
        theta: ``(N, 2, 3)`` float32 matrices from ``affine_from_codes``.
        interpolation: 'nearest' or 'bilinear' (rounded back to whole numbers).

    Returns:
        ``(N, 3, H, W)`` float32.
    """
    n, _, h, w = x.shape
    distinct, inverse = torch.unique(theta.reshape(n, 6), dim=0, return_inverse=True)
    if distinct.shape[0] == n:
        grid = _affine_grid(theta.to(x.device), h, w)  # (N, H, W, 2)
    else:
        grid = _affine_grid(distinct.view(-1, 2, 3).to(x.device), h, w)  # (U, H, W, 2)
        grid = grid.index_select(0, inverse.to(x.device))  # (N, H, W, 2)
    out = F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    return out if interpolation == "nearest" else out.round_()


def translate_(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """In place: shift each sample by whole pixels, fill 0: ``out[y, x] = in[y - dy, x - dx]``.

    Equals torchvision's tensor ``affine(translate=[dx, dy])`` (nearest or bilinear: the grid lands on
    pixel centres) with plain slicing: the samples of each distinct nonzero shift are gathered, shifted
    and written back; samples with shift (0, 0) are not touched.

    Args:
        x: ``(N, C, H, W)`` float32; overwritten.
        dx, dy: ``(N,)`` int64 CPU shifts (right and down positive).

    Returns:
        ``x``.
    """
    _, _, h, w = x.shape
    shifts, inverse = torch.unique(torch.stack([dx, dy], dim=1), dim=0, return_inverse=True)
    for k, (sx, sy) in enumerate(shifts.tolist()):
        if sx == 0 and sy == 0:
            continue
        idx = (inverse == k).nonzero().squeeze(1).to(x.device)
        src = x.index_select(0, idx)
        moved = torch.zeros_like(src)
        if abs(sx) < w and abs(sy) < h:
            moved[:, :, max(sy, 0) : h - max(-sy, 0), max(sx, 0) : w - max(-sx, 0)] = src[
                :, :, max(-sy, 0) : h - max(sy, 0), max(-sx, 0) : w - max(sx, 0)
            ]
        x.index_copy_(0, idx, moved)
    return x
