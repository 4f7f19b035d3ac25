"""Random erasing and Mixup / CutMix on normalized float batches, with soft targets.

Parameters are drawn on the CPU with a ``torch.Generator`` (``sample_*``) and applied to a batch on any
device, in place (``erase_``, ``mix_``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tinyswin.data.augment_geometry import sample_box_sides

__all__ = [
    "EraseParams",
    "MixParams",
    "erase_",
    "mix_",
    "mix_targets",
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
        noise: ``(T,)`` float32 standard normal values filling the boxes of the erased samples, in batch
            order and ``(C=3, h, w)`` order within each box (``T = sum 3 h w``), as torchvision draws them;
            None for a constant value.
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
    dense_noise: bool = False,
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
        generator: a generator; the draws are made on its device.
        attempts: tries per sample.
        dense_noise: draw the noise as a whole ``(n, 3, height, width)`` batch (its size does not depend on
            the boxes, so nothing waits for the device; ``erase_dense_`` takes it) instead of torchvision's
            box-by-box values.

    Returns:
        EraseParams.
    """
    dev = generator.device
    coin = torch.rand(n, generator=generator, dtype=torch.float64, device=dev) < p
    h, w = sample_box_sides(n, height * width, scale, ratio, attempts, generator)  # (n, attempts) each
    ok = (h < height) & (w < width)
    first = ok.to(torch.int64).argmax(dim=1, keepdim=True)  # (n, 1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    apply = coin & ok.any(dim=1)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64, device=dev)
    top = torch.minimum((u[:, 0] * (height - h + 1)).floor().to(torch.int64), height - h)
    left = torch.minimum((u[:, 1] * (width - w + 1)).floor().to(torch.int64), width - w)
    noise = None
    if random_value and dense_noise:
        noise = torch.randn(n, 3, height, width, generator=generator, device=dev)
    elif random_value:
        noise = torch.randn(int((3 * h * w)[apply].sum()), generator=generator)
    return EraseParams(apply=apply, top=top, left=left, height=h, width=w, noise=noise)


def _box_indices(params: EraseParams, channels: int, height: int, width: int) -> Tensor:
    """Flat indices into an ``(N, C, H, W)`` batch of every erased element, in noise order: ``(T,)`` int64."""
    idx = params.apply.nonzero().squeeze(1)  # (A,)
    bh, bw = params.height[idx], params.width[idx]
    area = bh * bw
    counts = channels * area  # (A,)
    owner = torch.repeat_interleave(torch.arange(len(idx)), counts)  # (T,): which erased sample
    local = torch.arange(int(counts.sum())) - (torch.cumsum(counts, 0) - counts)[owner]  # (T,)
    chan = torch.div(local, area[owner], rounding_mode="floor")
    rest = local - chan * area[owner]
    row = torch.div(rest, bw[owner], rounding_mode="floor")
    col = rest - row * bw[owner]
    row = row + params.top[idx][owner]
    col = col + params.left[idx][owner]
    return ((idx[owner] * channels + chan) * height + row) * width + col


def erase_(
    x: Tensor, params: EraseParams, value: float | tuple[float, ...] = 0.0, per_box: bool | None = None
) -> Tensor:
    """In place: fill each chosen sample's box with its noise (``params.noise``) or with ``value``.

    On a GPU, one indexed write over exactly the erased elements (their flat indices are built on the CPU);
    on a CPU, where that index arithmetic costs more than the copies, one slice assignment per box.

    Args:
        x: ``(N, C, H, W)`` float32 (normalized), contiguous; overwritten.
        params: draws from ``sample_erasing``.
        value: constant fill (scalar or one per channel) when ``params.noise`` is None.
        per_box: force the per-box (True) or the indexed (False) write; None picks by device.

    Returns:
        ``x``.
    """
    if not bool(params.apply.any()):
        return x
    _, c, h, w = x.shape
    if per_box or (per_box is None and x.device.type == "cpu"):
        fill = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(-1, 1, 1).expand(c, 1, 1)
        offset = 0
        rows = torch.stack([params.top, params.left, params.height, params.width], dim=1)[params.apply]
        for i, (top, left, bh, bw) in zip(
            params.apply.nonzero().squeeze(1).tolist(), rows.tolist(), strict=True
        ):
            if params.noise is not None:  # this box's (C, h, w) values, in torchvision's order
                size = c * bh * bw
                fill = params.noise[offset : offset + size].view(c, bh, bw)
                offset += size
            x[i, :, top : top + bh, left : left + bw] = fill
        return x
    flat = _box_indices(params, c, h, w)
    if params.noise is not None:
        fill = params.noise
    else:
        per_channel = torch.as_tensor(value, dtype=x.dtype).reshape(-1).expand(c)
        fill = per_channel[torch.div(flat, h * w, rounding_mode="floor") % c]
    x.view(-1).index_put_((flat.to(x.device),), fill.to(device=x.device, dtype=x.dtype))
    return x


def sample_beta(alpha: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) from two Gamma draws, float64 CPU ``(n,)``.

    ``torch._standard_gamma`` is the one sampler in torch that takes a ``torch.Generator`` (the public
    ``torch.distributions.Beta`` draws from the global generator).
    """
    conc = torch.full((2, n), float(alpha), dtype=torch.float64, device=generator.device)
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
        per_sample: whether modes, lambdas and boxes were drawn per sample (else one for the batch).
    """

    mode: Tensor
    lam: Tensor
    partner: Tensor
    box: Tensor
    per_sample: bool = False

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
    dev = generator.device
    u = torch.rand(k, 2, generator=generator, dtype=torch.float64, device=dev)
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
        sample_beta(mixup_alpha, k, generator)
        if mixup_alpha > 0
        else torch.ones(k, dtype=torch.float64, device=dev)
    )
    lam_cutmix = (
        sample_beta(cutmix_alpha, k, generator)
        if cutmix_alpha > 0
        else torch.ones(k, dtype=torch.float64, device=dev)
    )
    lam = torch.where(mode == MIX_CUTMIX, lam_cutmix, lam_mixup).clamp(*lam_clip)
    partner = torch.randperm(n, generator=generator, device=dev)

    cut = torch.sqrt(1.0 - lam)
    cut_h = (height * cut).to(torch.int64)
    cut_w = (width * cut).to(torch.int64)
    cy = torch.randint(height, (k,), generator=generator, device=dev)
    cx = torch.randint(width, (k,), generator=generator, device=dev)
    y1, y2 = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
    x1, x2 = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
    box = torch.stack([y1, y2, x1, x2], dim=1)  # (k, 4)
    lam = torch.where(mode == MIX_CUTMIX, 1.0 - ((y2 - y1) * (x2 - x1)).double() / (height * width), lam)
    lam = torch.where(mode == MIX_NONE, 1.0, lam)
    mode, lam, box = mode.expand(n), lam.expand(n), box.expand(n, 4)
    return MixParams(
        mode=mode.clone(), lam=lam.clone(), partner=partner, box=box.clone(), per_sample=per_sample
    )


def soft_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Smoothed one-hot targets ``(1 - s) * onehot + s / K``: ``(N,)`` int64 -> ``(N, K)`` float32.

    The one-hot rows are written by a scatter (``F.one_hot`` checks the labels' range, which waits for a
    GPU)."""
    onehot = torch.zeros(labels.shape[0], num_classes, dtype=torch.float32, device=labels.device)
    onehot.scatter_(1, labels.view(-1, 1), 1.0)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def mix_targets(labels: Tensor, params: MixParams, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Soft targets of a mixed batch: ``lam * y + (1 - lam) * y[partner]`` with smoothed one-hot ``y``.

    Args:
        labels: ``(N,)`` int64.
        params: draws from ``sample_mix``.
        num_classes: K.
        smoothing: label smoothing folded into both one-hot vectors.

    Returns:
        ``(N, K)`` float32 on ``labels``' device, rows summing to 1.
    """
    partner = params.partner.to(labels.device)
    targets = soft_targets(labels, num_classes, smoothing)
    lam = params.lam.to(device=labels.device, dtype=torch.float32).unsqueeze(1)  # (N, 1)
    return targets * lam + targets.index_select(0, partner) * (1.0 - lam)


def _mix_batch_(x: Tensor, params: MixParams) -> Tensor:
    """In place: one mode, lambda and box for the whole batch (per-batch ``MixParams``)."""
    mode = int(params.mode[0])
    partner = params.partner.to(x.device)
    if mode == MIX_MIXUP:
        lam = float(params.lam[0])
        other = x.index_select(0, partner).mul_(1.0 - lam)  # before x changes
        x.mul_(lam).add_(other)
    elif mode == MIX_CUTMIX:
        y1, y2, x1, x2 = params.box[0].tolist()
        x[:, :, y1:y2, x1:x2] = x[:, :, y1:y2, x1:x2].index_select(0, partner)
    return x


def _mix_per_sample_(x: Tensor, params: MixParams) -> Tensor:
    """In place: each sample's own mode, lambda and box, as one ``lerp`` towards the partners' pixels."""
    n, _, h, w = x.shape
    dev = x.device
    # weight of the partner's pixel: 1 - lambda (Mixup), 1 inside the box (CutMix), 0 (none)
    rows = torch.arange(h, device=params.box.device).view(1, h)
    cols = torch.arange(w, device=params.box.device).view(1, w)
    y1, y2, x1, x2 = params.box.unbind(1)
    in_rows = ((rows >= y1.view(n, 1)) & (rows < y2.view(n, 1))).to(x.dtype)  # (N, H)
    in_cols = ((cols >= x1.view(n, 1)) & (cols < x2.view(n, 1))).to(x.dtype)  # (N, W)
    is_cut = (params.mode == MIX_CUTMIX).to(x.dtype).view(n, 1, 1)
    blend = torch.where(params.mode == MIX_MIXUP, 1.0 - params.lam, 0.0).to(x.dtype).view(n, 1, 1)
    in_box = in_rows.to(dev).unsqueeze(2) * in_cols.to(dev).unsqueeze(1)  # (N, H, W)
    weight = in_box.mul_(is_cut.to(dev)).add_(blend.to(dev)).unsqueeze(1)  # (N, 1, H, W)
    return x.lerp_(x.index_select(0, params.partner.to(dev)), weight)


def mix_(
    x: Tensor, labels: Tensor, params: MixParams, num_classes: int, smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """In place: blend in (Mixup) or paste a box of (CutMix) each sample's partner; mix the targets alike.

    Per-batch Mixup is ``float32(lam) * x + float32(1 - lam) * x[partner]`` (the notebook's expression).

    Args:
        x: ``(N, C, H, W)`` float32, contiguous; overwritten.
        labels: ``(N,)`` int64 on ``x``'s device.
        params: draws from ``sample_mix``.
        num_classes: K.
        smoothing: label smoothing folded into the soft targets.

    Returns:
        ``(x, targets)``: ``x`` and ``(N, K)`` float32 soft targets summing to 1.
    """
    targets = mix_targets(labels, params, num_classes, smoothing)
    x = _mix_per_sample_(x, params) if params.per_sample else _mix_batch_(x, params)
    return x, targets
