"""Swin Transformer, from scratch: window ops, relative position bias, window attention, block, patch
merging, patch embedding or convolutional stem, stage, model; the `SwinConfig` dataclass and named presets.

Tensors inside the model are channels-last, (B, H, W, C). Geometry that depends on the input size (window
and shift actually used, padding, relative position index, shifted-window mask) is derived by pure helper
functions and cached per input size, so the state dict holds only learned weights and any input size that
the patch size and the patch merges allow works.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tinyswin.errors import FieldError

IntPair = tuple[int, int]
STEMS = ("patch", "conv", "spt")


# ----------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------


def _pair(value: int | Sequence[int]) -> IntPair:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


class SwinConfigError(FieldError):
    """A SwinConfig field refused (`field`, `value`, `reason`); the message is "SwinConfig.<field>=<value>:
    <reason>"."""

    template = "SwinConfig.{field}={value!r}: {reason}"


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
        stem: How pixels become tokens: "patch" (one conv, kernel = stride = patch size, as official Swin),
            "conv" (`ConvStem`: 3x3 stride-2 convs to the patch size's stride, then a 1x1 conv; patch_size a
            power of two >= 2) or "spt" (`ShiftedPatchEmbed`: shifted patch tokenization, Lee et al. 2021;
            patch_size even).
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
        if self.stem not in STEMS:
            fail("stem", f"must be one of {', '.join(STEMS)}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            fail(
                "stem",
                f"needs a patch_size that is a power of two >= 2 (one stride-2 conv per halving), "
                f"not {self.patch_size}",
            )
        if self.stem == "spt" and self.patch_size % 2:
            fail("stem", f"needs an even patch_size (copies shift by half a patch), not {self.patch_size}")
        height, width = _pair(img)
        if height % self.patch_size or width % self.patch_size:
            fail("img_size", f"is not divisible by patch_size {self.patch_size}")
        problem = size_problem((height, width), self.patch_size, stages)
        if problem:
            fail("img_size", problem)

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


def swin_t() -> SwinConfig:
    """Official Swin-T at 224px: C 96, depths 2-2-6-2, heads 3-6-12-24, window 7, drop path 0.2."""
    return SwinConfig()


def seed() -> SwinConfig:
    """The notebook's model, quirks included: 64px, patch 4, C 96, depths 2-2-6-2, heads 2-4-8-16, windows
    8-8-4-2, drop path 0.2, no patch norm, zero-initialised tables, a shift in every second block even where
    the window covers the map."""
    return SwinConfig(
        img_size=64,
        patch_size=4,
        num_classes=200,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 8, 16),
        window_size=(8, 8, 4, 2),
        mlp_ratio=4.0,
        drop_path_rate=0.2,
        patch_norm=False,
        shift_full_window=True,
        rpb_init_std=0.0,
    )


def tiny64() -> SwinConfig:
    """The seed geometry under the official rules: patch norm, a shift only where the window is smaller than
    the map, tables initialised with std 0.02."""
    return replace(seed(), patch_norm=True, shift_full_window=False, rpb_init_std=0.02)


def small64() -> SwinConfig:
    """A three-stage Swin for 64px inputs with the geometry of the small Swin of Lee et al. 2021: patch 2
    (32x32 tokens), C 96, depths 2-6-4, heads 3-6-12, window 4, drop path 0.1."""
    return SwinConfig(
        img_size=64,
        patch_size=2,
        num_classes=200,
        depths=(2, 6, 4),
        num_heads=(3, 6, 12),
        window_size=4,
        drop_path_rate=0.1,
    )


def nano() -> SwinConfig:
    """The recipes' small Swin, for two CPU cores and small images: C 48, depths 2-2-2, heads 2-4-8, window
    4, 10 classes, drop path 0.05 (1.27M parameters)."""
    return SwinConfig(
        img_size=64,
        num_classes=10,
        embed_dim=48,
        depths=(2, 2, 2),
        num_heads=(2, 4, 8),
        window_size=4,
        drop_path_rate=0.05,
    )


_PRESETS: Mapping[str, Callable[[], SwinConfig]] = MappingProxyType(
    {"swin_t": swin_t, "seed": seed, "tiny64": tiny64, "small64": small64, "nano": nano}
)


def preset_names() -> list[str]:
    """Names of the model presets."""
    return list(_PRESETS)


def preset_config(name: str, **overrides: object) -> SwinConfig:
    """The config of a named preset, with fields replaced by `overrides`.

    Args:
        name: One of `preset_names()`.
        **overrides: SwinConfig fields to change, e.g. num_classes=10.

    Returns:
        The validated config.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(_PRESETS)}")
    known = {f.name for f in fields(SwinConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown SwinConfig field(s) {', '.join(unknown)} for preset {name!r}")
    return replace(_PRESETS[name](), **overrides)


def count_flops(model: nn.Module, size: IntPair, in_chans: int = 3) -> int:
    """FLOPs (2 per multiply-add, as torch.utils.flop_counter counts) of one forward pass of one image.

    Attention is counted with the plain formula, whose matmuls the counter sees. The model may live on the
    meta device, which costs neither memory nor compute.

    Args:
        model: A SwinTransformer, or a part of one (e.g. a stem).
        size: (H, W) of the image.
        in_chans: Input channels.

    Returns:
        FLOPs per image.
    """
    attention = [m for m in model.modules() if isinstance(m, WindowAttention)]
    backends = [m.backend for m in attention]
    x = torch.zeros(1, in_chans, *size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    try:
        for m in attention:
            m.backend = "plain"
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, backend in zip(attention, backends, strict=True):
            m.backend = backend
    return counter.get_total_flops()


def describe_presets() -> str:
    """A table of the presets: geometry, parameters and forward GFLOPs per image at the preset's img_size."""
    header = f"{'preset':<9} {'img':>7} {'patch':>5} {'dim':>4} {'depths':<10} {'windows':<10} "
    header += f"{'classes':>7} {'params':>8} {'GFLOP/img':>9}"
    lines = [header, "-" * len(header)]
    for name in preset_names():
        config = preset_config(name)
        with torch.device("meta"):  # shapes only: instant, no memory
            model = SwinTransformer(config).eval()
        params = sum(p.numel() for p in model.parameters())
        height, width = _pair(config.img_size)
        gflops = count_flops(model, (height, width), config.in_chans) / 1e9
        depths = "-".join(map(str, config.depths))
        windows = "-".join(map(str, config.stage_windows))
        lines.append(
            f"{name:<9} {f'{height}x{width}':>7} {config.patch_size:>5} {config.embed_dim:>4} {depths:<10} "
            f"{windows:<10} {config.num_classes:>7} {params / 1e6:>7.2f}M {gflops:>9.3f}"
        )
    lines.append("GFLOP/img: one forward pass, 2 FLOPs per multiply-add (torch.utils.flop_counter)")
    added = []
    for name in preset_names():
        params, flops = conv_stem_cost(preset_config(name))
        added.append(f"{name} +{params / 1e6:.2f}M +{flops / 1e9:.3f}")
    lines.append("model.stem=conv adds (params, GFLOP/img): " + ", ".join(added))
    return "\n".join(lines)


def conv_stem_cost(config: SwinConfig) -> tuple[int, int]:
    """(parameters, forward FLOPs per image at the config's img_size) that `stem: conv` adds to the model of
    `config` (a patch size that is a power of two >= 2) over its patch embedding."""
    args = (config.patch_size, config.in_chans, config.embed_dim, config.patch_norm)
    with torch.device("meta"):  # shapes only
        conv, patch = ConvStem(*args), PatchEmbed(*args)
    size = _pair(config.img_size)
    params = sum(p.numel() for p in conv.parameters()) - sum(p.numel() for p in patch.parameters())
    return params, count_flops(conv, size, config.in_chans) - count_flops(patch, size, config.in_chans)


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
        geo,
        index.to(device),
        None if mask is None else mask.to(device),
        None if order is None else order.to(device),
        None if inverse is None else inverse.to(device),
    )


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


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


ATTENTION_BACKENDS = ("auto", "sdpa", "plain")
_SELF_MASK = -1e4  # LSA's score of a token for itself: exp() of it vanishes beside any unmasked score


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


class SwinStage(nn.Module):
    """Optional patch merging, then blocks alternating plain and shifted windows."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        table_window: IntPair,
        downsample: bool,
        config: SwinConfig,
        drop_path_rates: Sequence[float],
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                SwinBlock(
                    dim,
                    num_heads,
                    table_window,
                    shifted=i % 2 == 1,
                    shift_full_window=config.shift_full_window,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    drop_path_rate=drop_path_rates[i],
                    lsa=config.lsa,
                )
                for i in range(depth)
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
        height, width = _pair(config.img_size)
        grid = (height // config.patch_size, width // config.patch_size)
        embed = {"patch": PatchEmbed, "conv": ConvStem, "spt": ShiftedPatchEmbed}[config.stem]
        self.patch_embed = embed(config.patch_size, config.in_chans, config.embed_dim, config.patch_norm)
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear from 0
        stages = []
        for i, (depth, heads, window) in enumerate(
            zip(config.depths, config.num_heads, config.stage_windows, strict=True)
        ):
            res = (grid[0] // 2**i, grid[1] // 2**i)
            table_window = (min(window, res[0]), min(window, res[1]))
            start = sum(config.depths[:i])
            stages.append(
                SwinStage(
                    config.embed_dim * 2**i,
                    depth,
                    heads,
                    table_window,
                    downsample=i > 0,
                    config=config,
                    drop_path_rates=rates[start : start + depth],
                )
            )
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
        """Attention backend of every block: "auto" (default), "sdpa" or "plain"; see `window_attention`."""
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
        x = self.patch_embed(x)  # (B, H/p, W/p, C): PatchEmbed or ConvStem
        x = self.stages(x)  # (B, H', W', C_last)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) float -> (B, num_classes) logits."""
        x = self.forward_features(x).mean(dim=(1, 2))  # (B, C_last)
        return self.head(x)
