"""Swin Transformer, from scratch: the `SwinConfig` dataclass, window geometry (partition, relative position
index, shifted-window mask, token order), window attention with a relative position bias, block, patch
merging, stage, model (the named presets are in `model_presets`).

Tensors inside the model are channels-last, (B, H, W, C). Geometry that depends on the input size (window
and shift actually used, padding, relative position index, shifted-window mask) is derived by pure helper
functions and cached per input size, so the state dict holds only learned weights and any input size that
the patch size and the patch merges allow works. The stems, the MLP, the attention backend rule and the CPU
autograd functions live in `tinyswin.layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tinyswin.errors import SwinConfigError
from tinyswin.layers import (
    ATTENTION_BACKENDS,
    STEMS,
    Mlp,
    add_residual,
    permute_tokens,
    stem_problem,
    window_attention,
)

IntPair = tuple[int, int]


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


def _pair(value: int | Sequence[int]) -> IntPair:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class SwinConfig:
    """Architecture of a Swin Transformer (defaults: official Swin-T at 224px).

    Attributes:
        img_size: Training image size, an int or (H, W). Other sizes are accepted where the geometry allows.
        patch_size: Side of the square patches cut by the patch embedding.
        in_chans: Input channels.
        num_classes: Classes of the linear head (0: no head, the model returns pooled features).
        embed_dim: Width of the first stage; each patch merge doubles it.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Attention window side, one int for all stages or one per stage.
        mlp_ratio: Hidden width of the MLP relative to the block width.
        qkv_bias: Learned bias on the query, key and value projections.
        drop_path_rate: Stochastic depth rate of the last block; it rises linearly from 0 over the blocks.
        patch_norm: LayerNorm after the patch embedding (official Swin has it).
        shift_full_window: Shift every second block even where the window covers the whole feature map (by
            window // 2, with the usual mask). Official Swin drops the shift there.
        rpb_init_std: Std of the truncated normal that initialises the relative position tables (0: zeros).
        stem: How pixels become tokens (`layers.STEMS`): "patch" (one conv, kernel = stride = patch size, as
            official Swin), "conv" (`ConvStem`: 3x3 stride-2 convs to the patch size's stride, then a 1x1
            conv; patch_size a power of two >= 2) or "spt" (`ShiftedPatchEmbed`: shifted patch tokenization,
            Lee et al. 2021; patch_size even).
        lsa: Locality self-attention (Lee et al. 2021): a learned softmax temperature per attention layer and
            no attention of a token to itself.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int | tuple[int, ...] = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.2
    patch_norm: bool = True
    shift_full_window: bool = False
    rpb_init_std: float = 0.02
    stem: Literal["patch", "conv", "spt"] = "patch"  # "conv": early convolutions (Xiao et al. 2021)
    lsa: bool = False

    def __post_init__(self) -> None:
        # Lists (from YAML or JSON) become tuples so that the config stays hashable and comparable.
        for name in ("img_size", "depths", "num_heads", "window_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, message: str) -> None:
            raise SwinConfigError(name, getattr(self, name), message)

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        img = self.img_size
        if not (is_int(img) or (isinstance(img, tuple) and len(img) == 2 and all(map(is_int, img)))):
            fail("img_size", "must be an int or a pair (H, W) of ints")
        if min(_pair(img)) < 1:
            fail("img_size", "must be positive")
        for name in ("patch_size", "in_chans", "embed_dim"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "must be a positive int")
        if not is_int(self.num_classes) or self.num_classes < 0:
            fail("num_classes", "must be an int >= 0")
        if not isinstance(self.depths, tuple) or not self.depths:
            fail("depths", "must be a non-empty list of ints, one per stage")
        if not all(is_int(d) and d >= 1 for d in self.depths):
            fail("depths", "every stage needs at least one block")
        stages = len(self.depths)
        if not isinstance(self.num_heads, tuple) or len(self.num_heads) != stages:
            fail("num_heads", f"needs one entry per stage ({stages}, as depths)")
        for i, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2**i
            if not is_int(heads) or heads < 1 or width % heads:
                fail("num_heads", f"stage {i} has width {width}, which {heads!r} heads do not divide")
        windows = self.window_size
        if isinstance(windows, tuple):
            if len(windows) != stages:
                fail("window_size", f"needs one int for all stages or one per stage ({stages})")
        elif not is_int(windows):
            fail("window_size", "must be an int or a list of ints, one per stage")
        if not all(is_int(w) and w >= 1 for w in self.stage_windows):
            fail("window_size", "windows must be positive ints")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            fail("mlp_ratio", "must be a positive number")
        if not (isinstance(self.drop_path_rate, (int, float)) and 0.0 <= self.drop_path_rate < 1.0):
            fail("drop_path_rate", "must be in [0, 1)")
        if not (isinstance(self.rpb_init_std, (int, float)) and self.rpb_init_std >= 0.0):
            fail("rpb_init_std", "must be >= 0")
        for name in ("qkv_bias", "patch_norm", "shift_full_window", "lsa"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        if problem := stem_problem(self.stem, self.patch_size):
            fail("stem", problem)
        height, width = _pair(img)
        if height % self.patch_size or width % self.patch_size:
            fail("img_size", f"is not divisible by patch_size {self.patch_size}")
        problem = size_problem((height, width), self.patch_size, stages)
        if problem:
            fail("img_size", problem)

    @property
    def input_size(self) -> IntPair:
        """(H, W) of `img_size`."""
        return _pair(self.img_size)

    @property
    def stage_windows(self) -> tuple[int, ...]:
        """The window side requested for each stage."""
        if isinstance(self.window_size, tuple):
            return self.window_size
        return (self.window_size,) * len(self.depths)

    @property
    def stride(self) -> int:
        """Pixels per token of the last stage: input sides must be multiples of this."""
        return self.patch_size * 2 ** (len(self.depths) - 1)


def size_problem(size: IntPair, patch_size: int, num_stages: int) -> str | None:
    """Why an input of `size` pixels cannot go through the model, with the nearest sizes that can, or None.

    Args:
        size: (H, W) of the input in pixels.
        patch_size: Patch side of the patch embedding.
        num_stages: Stages; each after the first halves the token grid.

    Returns:
        None when the size works, else a one-line message.
    """
    stride = patch_size * 2 ** (num_stages - 1)
    bad = [
        (name, side)
        for name, side in zip(("height", "width"), size, strict=True)
        if side % stride or side < stride
    ]
    if not bad:
        return None
    parts = []
    for name, side in bad:
        below, above = (side // stride) * stride, (side // stride + 1) * stride
        options = f"{below} or {above}" if below > 0 else f"{above}"
        parts.append(f"{name} {side} is not a multiple of {stride} (nearest sizes that work: {options})")
    return (
        f"input {size[0]}x{size[1]} does not fit: sides must be multiples of {stride} "
        f"(patch {patch_size} x 2^{num_stages - 1} patch merges); " + "; ".join(parts)
    )


# ----------------------------------------------------------------------------------------------------
# Window geometry: pure helpers
# ----------------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: IntPair) -> torch.Tensor:
    """Cut a feature map into non-overlapping windows.

    Args:
        x: (B, H, W, C), H and W multiples of the window.
        window: (wh, ww).

    Returns:
        (B * nW, wh * ww, C), windows in row-major order per image.
    """
    b, h, w, c = x.shape
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c)  # (B, nH, wh, nW, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)  # (B*nWin, wh*ww, C)


def window_reverse(windows: torch.Tensor, window: IntPair, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`.

    Args:
        windows: (B * nW, wh * ww, C).
        window: (wh, ww).
        height: H of the feature map.
        width: W of the feature map.

    Returns:
        (B, H, W, C).
    """
    wh, ww = window
    c = windows.shape[-1]
    x = windows.view(-1, height // wh, width // ww, wh, ww, c)  # (B, nH, nW, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)  # (B, H, W, C)


def relative_position_index(window: IntPair, table_window: IntPair | None = None) -> torch.Tensor:
    """Index into a relative position table for every pair of tokens of a window.

    Args:
        window: (wh, ww) of the window attended over.
        table_window: (th, tw) the table was made for, each >= the window's side (default: the window).
            The table has (2*th - 1) * (2*tw - 1) rows, row-major over (dy, dx).

    Returns:
        (N, N) int64, N = wh * ww: entry [i, j] is the table row of the offset from token j to token i.
    """
    wh, ww = window
    th, tw = table_window or window
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (N,)
    dy = rows[:, None] - rows[None, :] + th - 1  # (N, N) in [th - wh, th + wh - 2]
    dx = cols[:, None] - cols[None, :] + tw - 1
    return dy * (2 * tw - 1) + dx


class WindowGeometry(NamedTuple):
    """How one block cuts a feature map of a given size into windows."""

    window: IntPair  # window actually used
    shift: IntPair  # cyclic shift, 0 where none
    padded: IntPair  # feature map size after padding to multiples of the window


def block_geometry(
    size: IntPair, table_window: IntPair, shifted: bool, shift_full_window: bool = False
) -> WindowGeometry:
    """Window, shift and padding of a block for a feature map of `size` tokens.

    The window is the table's window clamped to the map, per side; the shift (on shifted blocks) is half the
    window, and 0 on a side the window covers whole, as official Swin does, unless `shift_full_window`.

    Args:
        size: (H, W) of the feature map.
        table_window: (th, tw) of the block's relative position table.
        shifted: Whether the block is a shifted-window block (every second block).
        shift_full_window: Shift even on sides where the window covers the whole map.

    Returns:
        The block's WindowGeometry.
    """
    window = (min(size[0], table_window[0]), min(size[1], table_window[1]))
    shift = tuple(
        w // 2 if shifted and (s > w or shift_full_window) else 0 for s, w in zip(size, window, strict=True)
    )
    padded = tuple(math.ceil(s / w) * w for s, w in zip(size, window, strict=True))
    return WindowGeometry(window, shift, padded)  # type: ignore[arg-type]


def region_labels(length: int, padded: int, shift: int) -> torch.Tensor:
    """Label of each position of one side of the padded, shifted grid: 0 kept, 1 wrapped around, 2 padding.

    Args:
        length: Side of the feature map before padding.
        padded: Side after padding to a multiple of the window.
        shift: Cyclic shift (towards the start) applied after padding.

    Returns:
        (padded,) int64 labels.
    """
    pos = torch.arange(padded)
    origin = (pos + shift) % padded  # where the token at pos came from on the padded grid
    labels = (pos + shift >= padded).long()  # wrapped around
    return labels.masked_fill(origin >= length, 2)


def window_mask(size: IntPair, geometry: WindowGeometry) -> torch.Tensor | None:
    """Additive attention mask of the shifted and padded windows (0: may attend, -inf: may not).

    Two tokens may attend to each other iff, on the padded and shifted grid, they share a window and came
    from the same region, a region being, per side, the kept part, the part that wrapped around, or the
    padding.

    Args:
        size: (H, W) of the feature map before padding.
        geometry: The block's geometry at that size.

    Returns:
        (nW, 1, N, N) float32, nW windows per image in row-major order, or None when there is neither shift
        nor padding.
    """
    if geometry.shift == (0, 0) and geometry.padded == tuple(size):
        return None
    rows = region_labels(size[0], geometry.padded[0], geometry.shift[0])
    cols = region_labels(size[1], geometry.padded[1], geometry.shift[1])
    labels = (rows[:, None] * 3 + cols[None, :]).float()  # (Hp, Wp)
    labels = window_partition(labels[None, :, :, None], geometry.window).squeeze(-1)  # (nW, N)
    different = labels[:, :, None] != labels[:, None, :]  # (nW, N, N)
    mask = torch.zeros(different.shape).masked_fill(different, float("-inf"))
    return mask.unsqueeze(1)  # (nW, 1, N, N)


def window_token_order(geometry: WindowGeometry) -> torch.Tensor | None:
    """Order in which windows read the tokens of the padded map, after the cyclic shift.

    Args:
        geometry: The block's geometry.

    Returns:
        (Hp * Wp,) int64 permutation: position t of the windowed sequence (window-major, row-major inside a
        window) holds token `order[t]` of the padded (Hp, Wp) map, flattened row-major. None when windowing
        leaves the order unchanged: no shift, and windows as wide as the map or one row high (decided from
        the geometry, so that building a plan reads no tensor on the host).
    """
    hp, wp = geometry.padded
    if geometry.shift == (0, 0) and (geometry.window[1] == wp or geometry.window[0] == 1):
        return None  # windows of whole rows, or pieces of one row: the row-major order already
    tokens = torch.arange(hp * wp).view(1, hp, wp, 1)  # (1, Hp, Wp, 1)
    if geometry.shift != (0, 0):
        tokens = torch.roll(tokens, shifts=(-geometry.shift[0], -geometry.shift[1]), dims=(1, 2))
    return window_partition(tokens, geometry.window).flatten()  # (Hp*Wp,)


class BlockPlan(NamedTuple):
    """Everything a block derives from the size of its input map (cached per size and device)."""

    geometry: WindowGeometry
    index: torch.Tensor  # (N, N) relative position index into the block's table
    mask: torch.Tensor | None  # (nW, 1, N, N) shift/padding mask, or None
    order: torch.Tensor | None  # (Hp*Wp,) token order of the windows, or None if unchanged
    inverse: torch.Tensor | None  # (Hp*Wp,) inverse of order


def block_plan(
    size: IntPair, table_window: IntPair, shifted: bool, shift_full_window: bool, device: torch.device
) -> BlockPlan:
    """The BlockPlan of a block for a feature map of `size` tokens, with tensors on `device`."""
    geo = block_geometry(size, table_window, shifted, shift_full_window)
    index = relative_position_index(geo.window, table_window)
    mask = window_mask(size, geo)
    order = window_token_order(geo)
    inverse = None if order is None else torch.argsort(order)
    return BlockPlan(
        geo, index.to(device), *(None if t is None else t.to(device) for t in (mask, order, inverse))
    )


# ----------------------------------------------------------------------------------------------------
# Attention, block, merging, stage, model
# ----------------------------------------------------------------------------------------------------


_SELF_MASK = -1e4  # LSA's score of a token for itself: exp() of it vanishes beside any unmasked score


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Args:
        dim: Token width C.
        num_heads: Heads; each has C / heads channels.
        table_window: (th, tw) the relative position table covers.
        qkv_bias: Learned bias on the fused qkv projection.
        lsa: Locality self-attention (Lee et al. 2021): a learned temperature per head (`scale`, initialised
            at 1 / sqrt(d)) and no attention of a token to itself (the diagonal of the scores masked).
    """

    def __init__(
        self, dim: int, num_heads: int, table_window: IntPair, qkv_bias: bool = True, lsa: bool = False
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = nn.Parameter(torch.full((num_heads,), (dim // num_heads) ** -0.5)) if lsa else None
        self.table_window = table_window
        self.backend = "auto"
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        rows = (2 * table_window[0] - 1) * (2 * table_window[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))

    def relative_bias(self, index: torch.Tensor) -> torch.Tensor:
        """The relative position bias of a window.

        Args:
            index: (N, N) rows of the table, from `relative_position_index`.

        Returns:
            (heads, N, N).
        """
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.view(-1)]  # (N*N, heads)
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # (heads, N, N)

    def forward(self, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention within each window.

        Args:
            x: (B, nW, N, C) windows, nW per image.
            index: (N, N) relative position index.
            mask: (nW, 1, N, N) additive shift/padding mask, or None.

        Returns:
            (B, nW, N, C).
        """
        b, nw, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).view(b * nw, n, 3, heads, c // heads)  # (B*nW, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B*nW, heads, N, d), views
        bias = self.relative_bias(index).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            bias = bias + mask  # (nW, heads, N, N)
        if self.scale is not None:  # LSA: a token does not attend to itself (finite: a token alone in its
            # shifted region still attends to something)
            bias = bias.masked_fill(torch.eye(n, dtype=torch.bool, device=bias.device), _SELF_MASK)
        out = window_attention(q, k, v, bias.to(q.dtype), self.backend, self.scale)  # (B*nW, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, nw, n, c))  # (B, nW, N, C)


class SwinBlock(nn.Module):
    """Pre-norm transformer block over (shifted) windows.

    Args:
        dim: Token width C.
        num_heads: Attention heads.
        table_window: (th, tw) of the relative position table (the window at the config's image size).
        shifted: Shifted-window block (SW-MSA) rather than plain (W-MSA).
        shift_full_window: Shift even where the window covers the whole map.
        mlp_ratio: MLP hidden width / C.
        qkv_bias: Learned qkv bias.
        drop_path_rate: Stochastic depth rate of this block.
        lsa: Locality self-attention (see `WindowAttention`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        table_window: IntPair,
        shifted: bool,
        shift_full_window: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        lsa: bool = False,
    ) -> None:
        super().__init__()
        self.shifted = shifted
        self.shift_full_window = shift_full_window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, table_window, qkv_bias, lsa)
        self.drop_path_rate = drop_path_rate  # stochastic depth of both residual branches
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._plans: dict[tuple[IntPair, torch.device], BlockPlan] = {}

    def plan(self, size: IntPair, device: torch.device) -> BlockPlan:
        """The block's BlockPlan for a (H, W) map on `device`, cached.

        The model builds the plans of its input size when it is made or moved (`SwinTransformer.prepare`), so
        a compiled forward only looks them up. A plan missing there is built outside the graph (a graph break,
        and a recompile on the next call: once per new size).
        """
        key = (size, device)
        if key not in self._plans:
            build = torch.compiler.disable(block_plan) if torch.compiler.is_compiling() else block_plan
            table = self.attn.table_window
            self._plans[key] = build(size, table, self.shifted, self.shift_full_window, device)
        return self._plans[key]

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(Shifted) window attention of a normalised map: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        plan = self.plan((h, w), x.device)
        (wh, ww), (hp, wp) = plan.geometry.window, plan.geometry.padded
        if (hp, wp) != (h, w):
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))  # (B, Hp, Wp, C): padded before the shift
        tokens = x.reshape(b, hp * wp, c)  # (B, Hp*Wp, C)
        if plan.order is not None:
            tokens = permute_tokens(tokens, plan.order, plan.inverse)  # shift + partition in one gather
        windows = tokens.view(b, (hp // wh) * (wp // ww), wh * ww, c)  # (B, nW, N, C)
        tokens = self.attn(windows, plan.index, plan.mask).view(b, hp * wp, c)  # (B, Hp*Wp, C)
        if plan.order is not None:
            tokens = permute_tokens(tokens, plan.inverse, plan.order)  # reverse partition + shift
        x = tokens.view(b, hp, wp, c)  # (B, Hp, Wp, C)
        if (hp, wp) != (h, w):
            x = x[:, :h, :w, :]  # (B, H, W, C): cropped after the reverse shift
        return x

    def _attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.window_attention(self.norm1(x))

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        p = self.drop_path_rate
        x = add_residual(x, self._attention_branch, p, self.training)
        return add_residual(x, self._mlp_branch, p, self.training)


class PatchMerging(nn.Module):
    """Concatenate each 2x2 group of tokens, LayerNorm, Linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H/2, W/2, 2C)."""
        b, h, w, c = x.shape
        x = x.view(b, h // 2, 2, w // 2, 2, c)  # (B, H/2, dy, W/2, dx, C)
        # official order of the concatenation: (dy, dx) = (0,0), (1,0), (0,1), (1,1)
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Patch merging (but in the first stage), then blocks alternating plain and shifted windows.

    Args:
        config: The architecture.
        index: Which stage (0-based); its width is `config.embed_dim * 2**index`.
        table_window: (th, tw) of its blocks' relative position tables.
        drop_path_rates: Stochastic depth rate of each block (one per block).
    """

    def __init__(
        self, config: SwinConfig, index: int, table_window: IntPair, drop_path_rates: Sequence[float]
    ) -> None:
        super().__init__()
        dim, heads = config.embed_dim * 2**index, config.num_heads[index]
        self.downsample = PatchMerging(dim // 2) if index > 0 else nn.Identity()
        options = {"shift_full_window": config.shift_full_window, "mlp_ratio": config.mlp_ratio}
        options |= {"qkv_bias": config.qkv_bias, "lsa": config.lsa}
        self.blocks = nn.Sequential(
            *[
                SwinBlock(dim, heads, table_window, shifted=i % 2 == 1, drop_path_rate=rate, **options)
                for i, rate in enumerate(drop_path_rates)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C_in) -> (B, H', W', C)."""
        return self.blocks(self.downsample(x))


class SwinTransformer(nn.Module):
    """Swin Transformer image classifier.

    Args:
        config: The architecture.
    """

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        height, width = config.input_size
        grid = (height // config.patch_size, width // config.patch_size)
        self.patch_embed = STEMS[config.stem](
            config.patch_size, config.in_chans, config.embed_dim, config.patch_norm
        )
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear from 0
        stages = []
        for i, (depth, window) in enumerate(zip(config.depths, config.stage_windows, strict=True)):
            res = (grid[0] // 2**i, grid[1] // 2**i)
            table_window = (min(window, res[0]), min(window, res[1]))
            start = sum(config.depths[:i])
            stages.append(SwinStage(config, i, table_window, rates[start : start + depth]))
        self.stages = nn.Sequential(*stages)
        self.num_features = config.embed_dim * 2 ** (len(config.depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(self._init_weights)
        if config.rpb_init_std > 0:
            for module in self.modules():
                if isinstance(module, WindowAttention):
                    nn.init.trunc_normal_(module.relative_position_bias_table, std=config.rpb_init_std)
        self._prepared: list[IntPair] = []  # input sizes whose plans follow the model to every device
        self.prepare((height, width))

    def prepare(self, size: IntPair) -> None:
        """Build every block's plan (window geometry, index, mask, token order) for inputs of `size` (H, W)
        pixels on the model's device, and again whenever the model moves (`.to`, `.cuda`): a forward at that
        size then only looks plans up, so `torch.compile` traces one graph with no break and no host read.
        The config's `img_size` is prepared when the model is made.
        """
        if size not in self._prepared:
            self._prepared.append(size)
        device = self.norm.weight.device
        grid = (size[0] // self.config.patch_size, size[1] // self.config.patch_size)
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                block.plan((grid[0] // 2**i, grid[1] // 2**i), device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> SwinTransformer:
        """nn.Module's `_apply` (behind `.to`, `.cuda`, `.half`, ...), then the prepared plans on the new
        device."""
        super()._apply(fn, recurse)
        for size in self._prepared:
            self.prepare(size)
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def no_weight_decay_keywords(self) -> set[str]:
        """Substrings of parameter names that weight decay must skip (besides norms and biases)."""
        return {"relative_position_bias_table"}

    def set_attention_backend(self, backend: str) -> None:
        """Attention backend of every block: "auto" (default), "sdpa" or "plain" (see `window_attention`)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.backend = backend

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError, with the nearest sizes that work, if x cannot go through the model."""
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"input shape {tuple(x.shape)}: expected (B, {self.config.in_chans}, H, W)")
        problem = size_problem((x.shape[2], x.shape[3]), self.config.patch_size, len(self.config.depths))
        if problem:
            raise ValueError(problem)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H / stride, W / stride, C_last), after the final norm."""
        self.check_input(x)
        x = self.patch_embed(x)  # (B, H/p, W/p, C): one of `layers.STEMS`
        x = self.stages(x)  # (B, H', W', C_last)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) float -> (B, num_classes) logits."""
        x = self.forward_features(x).mean(dim=(1, 2))  # (B, C_last)
        return self.head(x)
