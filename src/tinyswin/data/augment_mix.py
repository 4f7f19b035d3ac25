"""Random erasing and Mixup / CutMix on normalized float batches, with soft targets.

Parameters are drawn on the CPU with a ``torch.Generator`` (``sample_*``) and applied to a batch on any
device (``erase``, ``mix``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EraseParams",
    "MixParams",
    "erase",
    "mix",
    "sample_beta",
    "sample_erasing",
    "sample_mix",
    "soft_targets",
]

MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2


@dataclass
class EraseParams:
    """Per-sample RandomErasing draws (CPU tensors).

    Attributes:
        apply: ``(N,)`` bool; False where the coin said no or no box fitted (image unchanged).
        top, left, height, width: ``(N,)`` int64 boxes (meaningful where ``apply``).
        noise: ``(A, 3, hmax, wmax)`` float32 standard normal values for the ``A`` erased samples (in batch
            order; the top-left ``height x width`` part of each fills its box), or None for a constant value.
    """

    apply: Tensor
    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor
    noise: Tensor | None


def sample_erasing(
    n: int,
    height: int,
    width: int,
    p: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    random_value: bool,
    generator: torch.Generator,
    attempts: int = 10,
) -> EraseParams:
    """Draw ``RandomErasing(p, scale, ratio)`` boxes for ``n`` samples, as torchvision's ``get_params``.

    Each sample erases with probability ``p``; it then tries ``attempts`` (area fraction, log-aspect) pairs
    and erases the first box strictly smaller than the image (none fitting: no erasing). With
    ``random_value`` the box is filled with per-pixel standard normal noise (torchvision's
    ``value='random'``), drawn here.

    Args:
        n: number of samples.
        height, width: image size (after any crop / resize).
        p: erasing probability.
        scale: range of the box area as a fraction of the image.
        ratio: range of the box aspect ratio (height / width), sampled log-uniformly.
        random_value: draw noise for the boxes.
        generator: CPU generator.
        attempts: tries per sample.

    Returns:
        EraseParams.
    """
    coin = torch.rand(n, generator=generator, dtype=torch.float64) < p
    area = float(height * width)
    target = area * (
        scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=generator, dtype=torch.float64)
    )
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, attempts, generator=generator, dtype=torch.float64))
    h = torch.round(torch.sqrt(target * aspect)).to(torch.int64)  # (n, attempts)
    w = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    ok = (h < height) & (w < width)
    first = ok.to(torch.int64).argmax(dim=1, keepdim=True)  # (n, 1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    apply = coin & ok.any(dim=1)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.minimum((u[:, 0] * (height - h + 1)).floor().to(torch.int64), height - h)
    left = torch.minimum((u[:, 1] * (width - w + 1)).floor().to(torch.int64), width - w)
    noise = None
    if random_value:
        count = int(apply.sum())
        hmax = int(h[apply].max()) if count else 0
        wmax = int(w[apply].max()) if count else 0
        noise = torch.randn(count, 3, hmax, wmax, generator=generator)
    return EraseParams(apply=apply, top=top, left=left, height=h, width=w, noise=noise)


def erase(x: Tensor, params: EraseParams, value: float | tuple[float, float, float] = 0.0) -> Tensor:
    """Fill each chosen sample's box with its noise (``params.noise``) or with ``value``.

    Args:
        x: ``(N, C, H, W)`` float32 (normalized).
        params: draws from ``sample_erasing``.
        value: constant fill (scalar or one per channel) when ``params.noise`` is None.

    Returns:
        ``(N, C, H, W)`` float32 (``x`` itself when nothing is erased).
    """
    idx = params.apply.nonzero().squeeze(1)  # (A,)
    if idx.numel() == 0:
        return x
    _, c, h, w = x.shape
    top, left = params.top[idx], params.left[idx]
    rows = torch.arange(h) - top.unsqueeze(1)  # (A, H): row inside the box
    cols = torch.arange(w) - left.unsqueeze(1)  # (A, W)
    inside = (rows >= 0) & (rows < params.height[idx].unsqueeze(1))
    inside = inside.unsqueeze(2) & ((cols >= 0) & (cols < params.width[idx].unsqueeze(1))).unsqueeze(
        1
    )  # (A, H, W)
    dev_idx = idx.to(x.device)
    inside = inside.to(x.device).unsqueeze(1)  # (A, 1, H, W)
    if params.noise is not None:
        noise = params.noise.to(x.device)  # (A, 3, hmax, wmax)
        a, _, hmax, wmax = noise.shape
        r = rows.clamp(0, hmax - 1).to(x.device).view(a, 1, h, 1).expand(a, c, h, wmax)
        q = cols.clamp(0, wmax - 1).to(x.device).view(a, 1, 1, w).expand(a, c, h, w)
        fill = noise.gather(2, r).gather(3, q)  # (A, C, H, W)
    else:
        fill = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    out = x.clone()
    out.index_copy_(0, dev_idx, torch.where(inside, fill, x.index_select(0, dev_idx)))
    return out


def sample_beta(alpha: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) from two Gamma draws, float64 CPU ``(n,)``."""
    conc = torch.full((2, n), float(alpha), dtype=torch.float64)
    g = torch._standard_gamma(conc, generator=generator)  # (2, n)
    total = g.sum(0)
    return torch.where(total > 0, g[0] / total.clamp(min=1e-300), torch.full_like(total, 0.5))


@dataclass
class MixParams:
    """Mixup / CutMix draws (CPU tensors).

    Attributes:
        mode: ``(N,)`` int64 per sample: 0 none, 1 Mixup, 2 CutMix (one value for all in per-batch mode).
        lam: ``(N,)`` float64 weight of the sample's own image and label (CutMix: the fraction of its own
            pixels left after pasting the clipped box); 1 where mode is 0.
        partner: ``(N,)`` int64 index of the sample mixed in (a random permutation).
        box: ``(N, 4)`` int64 CutMix boxes ``(y1, y2, x1, x2)``, clipped to the image.
    """

    mode: Tensor
    lam: Tensor
    partner: Tensor
    box: Tensor

    @property
    def any(self) -> bool:
        """Whether any sample is mixed."""
        return bool((self.mode != MIX_NONE).any())


def sample_mix(
    n: int,
    height: int,
    width: int,
    mixup_p: float,
    mixup_alpha: float,
    cutmix_p: float,
    cutmix_alpha: float,
    generator: torch.Generator,
    per_sample: bool = False,
    select: str = "sequential",
    lam_clip: tuple[float, float] = (0.001, 0.999),
) -> MixParams:
    """Draw the mixing mode, lambda, partner and CutMix box.

    Mode: with ``select='sequential'`` Mixup with probability ``mixup_p``, otherwise CutMix with probability
    ``cutmix_p`` (so CutMix has overall probability ``(1 - mixup_p) * cutmix_p``); with ``select='exclusive'``
    one draw picks Mixup with probability ``mixup_p`` and CutMix with probability ``cutmix_p``. One draw for
    the whole batch, or one per sample with ``per_sample``. Lambda ~ Beta(alpha, alpha) of the chosen mode,
    clipped to ``lam_clip``. CutMix box: side ``int(size * sqrt(1 - lam))`` around a uniform centre,
    clipped to the image; lambda is then recomputed from the clipped box.

    Args:
        n: batch size.
        height, width: image size.
        mixup_p, mixup_alpha, cutmix_p, cutmix_alpha: probabilities and Beta parameters.
        generator: CPU generator.
        per_sample: one mode, lambda and box per sample instead of per batch.
        select: 'sequential' or 'exclusive' (see above).
        lam_clip: bounds for lambda before the CutMix correction.

    Returns:
        MixParams.
    """
    k = n if per_sample else 1
    u = torch.rand(k, 2, generator=generator, dtype=torch.float64)
    if select == "sequential":
        mode = torch.where(
            u[:, 0] < mixup_p, MIX_MIXUP, torch.where(u[:, 1] < cutmix_p, MIX_CUTMIX, MIX_NONE)
        )
    elif select == "exclusive":
        mode = torch.where(
            u[:, 0] < mixup_p, MIX_MIXUP, torch.where(u[:, 0] < mixup_p + cutmix_p, MIX_CUTMIX, MIX_NONE)
        )
    else:
        raise ValueError(f"mix select must be 'sequential' or 'exclusive', got {select!r}")
    lam_mixup = (
        sample_beta(mixup_alpha, k, generator) if mixup_alpha > 0 else torch.ones(k, dtype=torch.float64)
    )
    lam_cutmix = (
        sample_beta(cutmix_alpha, k, generator) if cutmix_alpha > 0 else torch.ones(k, dtype=torch.float64)
    )
    lam = torch.where(mode == MIX_CUTMIX, lam_cutmix, lam_mixup).clamp(*lam_clip)
    partner = torch.randperm(n, generator=generator)

    cut = torch.sqrt(1.0 - lam)
    cut_h = (height * cut).to(torch.int64)
    cut_w = (width * cut).to(torch.int64)
    cy = torch.randint(height, (k,), generator=generator)
    cx = torch.randint(width, (k,), generator=generator)
    y1, y2 = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
    x1, x2 = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
    box = torch.stack([y1, y2, x1, x2], dim=1)  # (k, 4)
    lam = torch.where(mode == MIX_CUTMIX, 1.0 - ((y2 - y1) * (x2 - x1)).double() / (height * width), lam)
    lam = torch.where(mode == MIX_NONE, 1.0, lam)
    mode, lam, box = mode.expand(n), lam.expand(n), box.expand(n, 4)
    return MixParams(mode=mode.clone(), lam=lam.clone(), partner=partner, box=box.clone())


def soft_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Smoothed one-hot targets ``(1 - s) * onehot + s / K``: ``(N,)`` int64 -> ``(N, K)`` float32."""
    onehot = F.one_hot(labels, num_classes).to(torch.float32)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def mix(
    x: Tensor, labels: Tensor, params: MixParams, num_classes: int, smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Blend (Mixup) or paste boxes of (CutMix) each sample's partner, and mix the targets the same way.

    Args:
        x: ``(N, C, H, W)`` float32.
        labels: ``(N,)`` int64 on ``x``'s device.
        params: draws from ``sample_mix``.
        num_classes: K.
        smoothing: label smoothing folded into the soft targets.

    Returns:
        ``(x, targets)``: ``(N, C, H, W)`` float32 and ``(N, K)`` float32 soft targets summing to 1.
    """
    n, _, h, w = x.shape
    dev = x.device
    partner = params.partner.to(dev)
    lam = params.lam.to(device=dev, dtype=torch.float32)
    y1, y2, x1, x2 = (params.box[:, i].view(n, 1, 1) for i in range(4))
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    in_box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)  # (N, H, W)
    cutmix = (params.mode == MIX_CUTMIX).view(n, 1, 1)
    own = torch.where(cutmix, (~in_box).to(torch.float32), params.lam.to(torch.float32).view(n, 1, 1))
    own = own.to(dev).unsqueeze(1)  # (N, 1, H, W): weight of the sample's own pixel
    other = x.index_select(0, partner)
    out = torch.lerp(other, x, own)
    targets = soft_targets(labels, num_classes, smoothing)
    lam = lam.unsqueeze(1)  # (N, 1)
    targets = targets * lam + targets.index_select(0, partner) * (1.0 - lam)
    return out, targets
