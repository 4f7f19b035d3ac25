"""The layers the Swin Transformer is built from that are not its window logic, kept beside `model.py` as timm
keeps its fused attention and stems in `layers/`: what makes training fast on a CPU, the attention backend
rule, and the stems that turn pixels into tokens.

- `add_residual`: x + drop_path(branch(x)), the branch computed only for the samples stochastic depth keeps
  (on the CPU; `_AddRows` saves only their index for the backward pass); `drop_path`.
- `permute_tokens`: a gather along the token axis whose backward is the inverse gather (`_PermuteTokens`),
  which does a block's cyclic shift and window partition in one.
- `window_attention`: attention inside windows with an additive bias, and the rule that picks
  `F.scaled_dot_product_attention` or the plain formula (`ATTENTION_BACKENDS`).
- `Mlp`: Linear, GELU (in place when autograd does not record), Linear.
- The stems, by name in `STEMS`: `PatchEmbed` (official Swin), `ConvStem` (`StemConv` x n, then a 1x1 conv)
  and `ShiftedPatchEmbed`. Each maps (B, C_in, H, W) to (B, H/p, W/p, C) tokens, channels-last;
  `stem_problem` says which names and patch sizes they take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p, scale the rest.

    Args:
        x: (B, ...) a residual branch.
        p: Drop probability.
        training: Identity unless True.

    Returns:
        Tensor of x's shape with expectation x.
    """
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask.div_(keep)


class _AddRows(torch.autograd.Function):
    """x + scale * scattered rows: out[rows[i]] = x[rows[i]] + scale * src[i]; only `rows` is saved for the
    backward pass (torch.index_add would also keep `src` alive)."""

    @staticmethod
    def forward(x: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.index_add(x, 0, rows, src, alpha=scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.rows, ctx.scale = inputs[1], inputs[3]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        return grad, None, grad.index_select(0, ctx.rows) * ctx.scale, None


def add_residual(
    x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], p: float, training: bool
) -> torch.Tensor:
    """x + drop_path(branch(x)), computing the branch only for the samples that stochastic depth keeps.

    Each sample is kept with probability 1 - p and its branch output scaled by 1 / (1 - p), as
    `drop_path`; the branch must treat samples independently (true of every Swin block branch). On the
    CPU, outside torch.compile, dropped samples are not computed at all, which saves a fraction p of the
    branch's work; elsewhere the branch runs on the whole batch and is masked (`drop_path`), which keeps
    shapes static and avoids a device sync.

    Args:
        x: (B, ...) input of the residual block.
        branch: Residual branch, (b, ...) -> (b, ...) for any b; it must return a new tensor, which
            may be added to in place.
        p: Drop probability.
        training: Without it, x + branch(x).

    Returns:
        (B, ...).
    """
    if not training or p == 0.0:
        return branch(x).add_(x)
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return x + drop_path(branch(x), p, training)
    keep = 1.0 - p
    kept = (torch.rand(x.shape[0]) < keep).nonzero().squeeze(1)  # (b,) indices of kept samples
    if kept.numel() == x.shape[0]:
        return torch.add(x, branch(x), alpha=1.0 / keep)
    if kept.numel() == 0:
        return x
    return _AddRows.apply(x, kept, branch(x.index_select(0, kept)), 1.0 / keep)


class _PermuteTokens(torch.autograd.Function):
    """index_select along the token axis, with the inverse permutation as its backward (a gather, not a
    scatter-add)."""

    @staticmethod
    def forward(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, order)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.inverse = inputs[2]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        return grad.index_select(1, ctx.inverse), None, None


def permute_tokens(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Reorder tokens: out[:, t] = x[:, order[t]].

    Args:
        x: (B, L, C).
        order: (L,) int64 permutation.
        inverse: (L,) its inverse, used by the backward pass.

    Returns:
        (B, L, C).
    """
    return _PermuteTokens.apply(x, order, inverse)


ATTENTION_BACKENDS = ("auto", "sdpa", "plain")


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    backend: str = "auto",
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention inside windows, with an additive float bias per window position.

    Backends: "sdpa" calls F.scaled_dot_product_attention with the bias as its float mask (repeated for every
    image when it differs between window positions); "plain" is the textbook formula
    softmax(q k^T / sqrt(d) + bias) v, scaling and biasing the scores in place so that autograd keeps only
    q, k, v and the probabilities. "auto" takes "sdpa" except on the CPU where "plain" is faster: when
    autograd records (SDPA has no fused CPU kernel for a mask that needs a gradient; its fallback is slower
    and keeps two more tensors of the scores' size alive) and for windows of fewer than 32 tokens.

    Args:
        q: (B * nW, heads, N, d), nW windows per image.
        k: (B * nW, heads, N, d).
        v: (B * nW, heads, N, d).
        bias: (nW, heads, N, N) or (1, heads, N, N): relative position bias plus shift/padding mask (0 or
            -inf), the same for the window at one position in every image.
        backend: "auto", "sdpa" or "plain".
        scale: (heads,) the scale of the scores of each head (LSA's learned temperature), or None for
            1 / sqrt(d).

    Returns:
        (B * nW, heads, N, d).
    """
    bw, heads, n, _ = q.shape
    nw = bias.shape[0]
    if backend == "auto":
        records = torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad)
        backend = "plain" if q.device.type == "cpu" and (records or n < 32) else "sdpa"
    if backend == "sdpa":
        if nw > 1:  # (B, nW, heads, N, N) -> (B*nW, heads, N, N)
            bias = bias.expand(bw // nw, nw, heads, n, n).reshape(bw, heads, n, n)
        if scale is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        q = q * scale.view(1, heads, 1, 1).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    scores = torch.matmul(q, k.transpose(-2, -1))  # (B*nW, heads, N, N)
    if scale is None:
        scores.mul_(q.shape[-1] ** -0.5)
    else:
        scores = scores * scale.view(1, heads, 1, 1).to(scores.dtype)
    scores.view(bw // nw, nw, heads, n, n).add_(bias)  # in place, broadcast over the images
    return torch.matmul(scores.softmax(dim=-1), v)


class Mlp(nn.Module):
    """Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        # when autograd does not record, GELU in place spares a buffer the size of the hidden layer
        hidden = self.act(hidden) if hidden.requires_grad else torch.ops.aten.gelu_(hidden)
        return self.fc2(hidden)


class PatchEmbed(nn.Module):
    """Non-overlapping patches: conv with kernel = stride = patch size, then an optional LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H/p, W/p, C), contiguous."""
        # A channels-last input makes the conv write channels-last, so the permute below is free and every
        # later op sees contiguous (B, H, W, C) tokens.
        x = self.proj(x.contiguous(memory_format=torch.channels_last))  # (B, C, H/p, W/p), channels-last
        return self.norm(x.permute(0, 2, 3, 1).contiguous())  # (B, H/p, W/p, C)


def conv_stem_widths(patch_size: int, dim: int) -> tuple[int, ...]:
    """Output channels of the conv stem's stride-2 convs: one per halving, doubling up to `dim` (patch 4:
    dim/2, dim; patch 2: dim; patch 8: dim/4, dim/2, dim), as timm's hybrid ConvStem tiers them."""
    halvings = patch_size.bit_length() - 1
    return tuple(max(dim // 2 ** (halvings - 1 - i), 1) for i in range(halvings))


class StemConv(nn.Module):
    """3x3 stride-2 conv (no bias: the norm's shift replaces it), LayerNorm over channels, GELU."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_chans)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) channels-last -> (B, C_out, H/2, W/2) channels-last."""
        x = self.conv(x).permute(0, 2, 3, 1)  # (B, H/2, W/2, C_out), contiguous from a channels-last conv
        return self.act(self.norm(x)).permute(0, 3, 1, 2)  # (B, C_out, H/2, W/2), channels-last memory


class ConvStem(nn.Module):
    """A convolutional stem in place of the patch embedding (`stem: conv`), after Xiao et al. 2021, "Early
    Convolutions Help Transformers See Better": 3x3 stride-2 convs, one per halving of the patch size, then a
    1x1 conv to the embedding width and the patch norm as `PatchEmbed` has it. Same token grid and width as
    `PatchEmbed`, so everything after it is unchanged.

    The paper (and timm's hybrid `ConvStem` by default) puts BatchNorm and ReLU after each 3x3 conv; this stem
    uses LayerNorm over channels (as ConvNeXt normalises its stem) and GELU (as this model's MLPs), so that
    the model stays free of batch statistics: an image's logits do not depend on the other images of its
    batch (per-device batches, accumulation steps, evaluation's padded last batch), training and evaluation
    compute the same function, and the state dict holds learned weights only (no running statistics for the
    EMA, DDP or old checkpoints to carry).

    Widths for patch 4: in_chans -> dim/2 -> dim, then dim -> dim (1x1). Cost at 64px, forward FLOPs per image
    (2 per multiply-add) of the stem's convs: C 48 (`nano`) 7.8M against the patch embedding's 1.2M, C 96
    (`seed`) 28.6M against 2.4M; the model grows by 7% (nano, 0.094 GFLOP) and 3.6% (seed, 0.732 GFLOP).
    `tinyswin info` lists what it adds to each preset.

    Args:
        patch_size: Total stride, a power of two >= 2.
        in_chans: Input channels.
        dim: Embedding width C.
        norm: LayerNorm after the 1x1 conv (the config's `patch_norm`).
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm: bool) -> None:
        super().__init__()
        widths = conv_stem_widths(patch_size, dim)
        self.convs = nn.Sequential(
            *[StemConv(c_in, c_out) for c_in, c_out in zip((in_chans, *widths[:-1]), widths, strict=True)]
        )
        self.proj = nn.Conv2d(widths[-1], dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H/p, W/p, C), contiguous."""
        x = self.convs(x.contiguous(memory_format=torch.channels_last))  # (B, C_last, H/p, W/p)
        x = self.proj(x)  # (B, C, H/p, W/p), channels-last
        return self.norm(x.permute(0, 2, 3, 1).contiguous())  # (B, H/p, W/p, C)


class ShiftedPatchEmbed(nn.Module):
    """Shifted patch tokenization (`stem: spt`), after Lee et al. 2021, "Vision Transformer for Small-Size
    Datasets": the image and four copies of it shifted by half a patch diagonally (zero-filled) are stacked
    along channels, cut into patches, and each flattened patch is normalised (LayerNorm) and projected to the
    embedding width; then the patch norm as `PatchEmbed` has it. Each token sees its own patch and parts of
    its eight neighbours, at a cost of 5x the patch embedding's multiply-adds. Same token grid and width as
    `PatchEmbed`.

    Args:
        patch_size: Patch side p, even.
        in_chans: Input channels.
        dim: Embedding width C.
        norm: LayerNorm after the projection (the config's `patch_norm`).
    """

    SHIFTS = ((-1, -1), (1, -1), (-1, 1), (1, 1))  # each copy moved by (dx, dy) half patches: left-up, ...

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_dim = 5 * in_chans * patch_size * patch_size
        self.patch_norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def shifted_stack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 5 C_in, H, W): the image, then its four shifted copies."""
        h, w = x.shape[-2:]
        s = self.patch_size // 2
        padded = F.pad(x, (s, s, s, s))  # (B, C_in, H + 2s, W + 2s), zeros around
        # the copy moved by (dx, dy) half patches reads the padded image from offset (s - dy*s, s - dx*s)
        copies = [
            padded[..., s - dy * s : s - dy * s + h, s - dx * s : s - dx * s + w] for dx, dy in self.SHIFTS
        ]
        return torch.cat([x, *copies], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H/p, W/p, C), contiguous."""
        b, _, h, w = x.shape
        p = self.patch_size
        x = self.shifted_stack(x)  # (B, 5C_in, H, W)
        c = x.shape[1]
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, 5C_in, p, p)
        x = x.reshape(b, h // p, w // p, c * p * p)  # (B, H/p, W/p, 5C_in p^2)
        return self.norm(self.proj(self.patch_norm_in(x)))  # (B, H/p, W/p, C)


# a stem by its name in `SwinConfig.stem`; each takes (patch_size, in_chans, dim, norm)
STEMS: Mapping[str, type[nn.Module]] = MappingProxyType(
    {"patch": PatchEmbed, "conv": ConvStem, "spt": ShiftedPatchEmbed}
)


def stem_problem(stem: str, patch_size: int) -> str | None:
    """Why `stem` is not a stem's name in `STEMS` or cannot cut patches of `patch_size` pixels (a one-line
    reason), or None."""
    if not isinstance(stem, str) or stem not in STEMS:  # (a list from YAML is no name)
        return f"must be one of {', '.join(STEMS)}"
    if stem == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
        halvings = "one stride-2 conv per halving"
        return f"needs a patch_size that is a power of two >= 2 ({halvings}), not {patch_size}"
    if stem == "spt" and patch_size % 2:
        return f"needs an even patch_size (copies shift by half a patch), not {patch_size}"
    return None
