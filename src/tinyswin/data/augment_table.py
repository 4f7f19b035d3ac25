"""The RandAugment ops, one row each: everything the backends know about an op.

A row gives the op's name, its eager op, its magnitude range (the argument at each magnitude bin, from
torchvision's ``_augmentation_space``), whether the argument takes a random sign, its kind (the class of
its eager op) and its code in the C kernels' switch (``augment_kernels.c``; a test checks the two agree).
The rows stand in torchvision's order; an op's index in ``RandAugmentParams.ops`` is its row's index here,
and every backend finds what it needs through the row (``augment_policy``, ``augment_device``,
``augment_native``): no code names an op's position. Adding an op, anywhere in the table, is a row here,
its eager op (``augment_ops``) and its kernel in ``augment_kernels.c`` (an enum entry and a case).

The kinds:

- ``Geometric``: an affine warp, or a shift by whole pixels; the op names the affine parameter its argument
  sets (``augment_geometry.AFFINE_PARAMS``).
- ``Lookup``: maps each value of each channel through a per-sample, per-channel table,
  ``map_(v, stats(image), arg)``, with statistics of the sample's image (its gray mean, its channels' ranges
  or histograms). ``augment_policy`` runs it on the images; ``augment_device`` runs it on the 256 levels,
  which gives the table, and looks every pixel up.
- ``Blend``: ``f * x + (1 - f) * degenerate(image)`` with ``f = 1 + arg``, torchvision's ``_blend``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import torch
from torch import Tensor

from tinyswin.data import augment_ops as ops
from tinyswin.data.augment_geometry import AFFINE_PARAMS

__all__ = [
    "RANDAUGMENT",
    "RANDAUGMENT_OPS",
    "Bits",
    "Blend",
    "Geometric",
    "Linear",
    "Lookup",
    "RandAugmentOp",
    "Views",
    "affine_codes",
    "kernel_codes",
    "op_row",
    "rows_of",
    "signed_ops",
]


class Views:
    """An image batch and the images several ops derive from it, each computed once, when first read.

    Args:
        x: ``(N, 3, H, W)`` float32 whole numbers in [0, 255].
        gray: its gray image where the caller has it.
        sync_free: the ops' statistics must not wait for the device (``augment_device``), on a CPU too.
    """

    def __init__(self, x: Tensor, gray: Tensor | None = None, sync_free: bool = False) -> None:
        self.x = x
        self.sync_free = sync_free
        if gray is not None:
            self.gray = gray

    @cached_property
    def gray(self) -> Tensor:
        """``(N, 1, H, W)`` gray image (``augment_ops.grayscale``)."""
        return ops.grayscale(self.x)

    @cached_property
    def values(self) -> Tensor:
        """``(N, 3, H*W)`` int64: the images' values, as indices."""
        n, c, h, w = self.x.shape
        return self.x.reshape(n, c, h * w).to(torch.int64)


@dataclass(frozen=True)
class Geometric:
    """A geometric op: its argument sets one parameter of torchvision's affine transform.

    Attributes:
        affine: the parameter, from ``augment_geometry.AFFINE_PARAMS``.
    """

    affine: str

    @property
    def shift(self) -> str | None:
        """'x' or 'y' for a translation (a shift by whole pixels), None for a warp."""
        return {"translate_x": "x", "translate_y": "y"}.get(self.affine)


@dataclass(frozen=True)
class Lookup:
    """An op that maps each value of a channel through a per-sample table (None: the identity).

    Attributes:
        map_: ``(v, stats, arg) -> v``, in place on a ``(N, 3, ...)`` batch of levels, with ``arg`` the
            ``(N,)`` signed arguments.
        stats: ``(Views) -> stats`` of the images that the table depends on (None: none).
    """

    map_: Callable[[Tensor, Any, Tensor], Tensor] | None
    stats: Callable[[Views], Any] | None = None

    def apply_(self, x: Tensor, arg: Tensor) -> Tensor:
        """In place on ``(N, 3, H, W)`` images ``x`` with ``(N,)`` arguments; returns ``x``."""
        if self.map_ is None:
            return x
        return self.map_(x, None if self.stats is None else self.stats(Views(x)), arg)


@dataclass(frozen=True)
class Blend:
    """An op that blends each image with a degenerate image, factor ``1 + arg``.

    Attributes:
        degenerate: ``(Views) -> (N, 3 or 1, H, W)`` image, or None where the op leaves images of this size
            as they are. A new tensor or ``Views.gray``: the caller may overwrite it.
    """

    degenerate: Callable[[Views], Tensor | None]

    def apply_(self, x: Tensor, arg: Tensor) -> Tensor:
        """In place on ``(N, 3, H, W)`` images ``x`` with ``(N,)`` arguments; returns ``x``."""
        degenerate = self.degenerate(Views(x))
        return x if degenerate is None else ops.blend_(x, degenerate, 1.0 + arg)


@dataclass(frozen=True)
class Linear:
    """Magnitude range: the arguments of the bins spaced evenly from ``start`` (bin 0) to ``end`` (the last
    bin), float32 as torchvision's ``linspace``; fractional bins (a magnitude std) interpolate linearly
    between neighbouring bins. With ``per`` 'width' or 'height' both ends are fractions of that image side.
    """

    start: float
    end: float
    per: str = ""

    interpolates = True  # a whole-bin table gives every bin's argument

    def values(self, magnitude: Tensor, num_bins: int, height: int, width: int) -> Tensor:
        """``(N,)`` float64 unsigned arguments of ``(N,)`` float64 bins in ``[0, num_bins - 1]``."""
        side = {"": 1, "width": width, "height": height}[self.per]
        ends = (self.start, self.end) if not self.per else (self.start * side, self.end * side)
        table = torch.linspace(*ends, num_bins).double()  # float32 entries, as torchvision's table
        lo = magnitude.floor().clamp(0, num_bins - 1).to(torch.int64)
        hi = (lo + 1).clamp(max=num_bins - 1)
        frac = magnitude - lo.double()
        return table[lo] + frac * (table[hi] - table[lo])


@dataclass(frozen=True)
class Bits:
    """Magnitude range: whole bits from ``start`` (bin 0) down to ``end`` (the last bin), torchvision's
    ``start - round(bin / ((num_bins - 1) / (start - end)))`` in float32, for fractional bins too."""

    start: int
    end: int

    interpolates = False  # fractional bins take the formula, not the neighbours' mean

    def values(self, magnitude: Tensor, num_bins: int, height: int, width: int) -> Tensor:
        """``(N,)`` float64 bits of ``(N,)`` float64 bins."""
        step = (num_bins - 1) / (self.start - self.end)
        return (self.start - (magnitude.to(torch.float32) / step).round().to(torch.int64)).double()


@dataclass(frozen=True)
class RandAugmentOp:
    """One RandAugment op (a row of ``RANDAUGMENT``).

    Attributes:
        name: torchvision's name.
        op: the eager op; its class is the op's kind.
        magnitude: the argument at each magnitude bin (``Linear``, ``Bits``), or None (no argument: 0).
        signed: the argument takes a random sign.
        kernel_code: the op's case in ``augment_kernels.c`` (``enum randaugment_op``).
    """

    name: str
    op: Geometric | Lookup | Blend
    magnitude: Linear | Bits | None
    signed: bool
    kernel_code: int

    @property
    def kind(self) -> type:
        """``Geometric``, ``Lookup`` or ``Blend``."""
        return type(self.op)

    @property
    def identity(self) -> bool:
        """Whether the op leaves every image as it is."""
        return isinstance(self.op, Lookup) and self.op.map_ is None

    def values(self, magnitude: Tensor, num_bins: int, height: int, width: int) -> Tensor:
        """``(N,)`` float64 unsigned arguments of ``(N,)`` float64 magnitude bins."""
        if self.magnitude is None:
            return torch.zeros_like(magnitude)
        return self.magnitude.values(magnitude, num_bins, height, width)


# the ops' parts: (v, stats, arg) -> v maps and (Views) -> stats of the lookup ops, the blends' degenerates


def _brightness(v: Tensor, _: None, arg: Tensor) -> Tensor:
    return ops.adjust_brightness_(v, 1.0 + arg)


def _contrast(v: Tensor, mean: Tensor, arg: Tensor) -> Tensor:
    return ops.blend_mean_(v, mean, 1.0 + arg)


def _gray_mean(views: Views) -> Tensor:
    return ops.gray_mean(views.gray)


def _posterize(v: Tensor, _: None, arg: Tensor) -> Tensor:
    return ops.posterize_(v, arg.to(torch.int64))


def _solarize(v: Tensor, _: None, arg: Tensor) -> Tensor:
    return ops.solarize_(v, arg)


def _stretch(v: Tensor, bounds: tuple[Tensor, Tensor], _: Tensor) -> Tensor:
    return ops.stretch_(v, *bounds)


def _bounds(views: Views) -> tuple[Tensor, Tensor]:
    return ops.autocontrast_bounds(views.x)


def _equalize(v: Tensor, tables: Tensor, _: Tensor) -> Tensor:
    return ops.lookup_(v, tables)


def _histograms(views: Views) -> Tensor:
    return ops.equalize_tables(views.x, views.values, views.sync_free)


def _gray(views: Views) -> Tensor:
    return views.gray


def _smoothed(views: Views) -> Tensor | None:
    return ops.sharpness_degenerate(views.x)


_TRANSLATE = 150.0 / 331.0  # torchvision's translation range, a fraction of the image side

# name, eager op (its class is the kind), magnitude range (bin 0 -> last bin), signed, C kernel code
RANDAUGMENT: tuple[RandAugmentOp, ...] = (
    RandAugmentOp("Identity", Lookup(None), None, False, 0),
    RandAugmentOp("ShearX", Geometric("shear_x"), Linear(0.0, 0.3), True, 1),
    RandAugmentOp("ShearY", Geometric("shear_y"), Linear(0.0, 0.3), True, 2),
    RandAugmentOp("TranslateX", Geometric("translate_x"), Linear(0.0, _TRANSLATE, "width"), True, 3),
    RandAugmentOp("TranslateY", Geometric("translate_y"), Linear(0.0, _TRANSLATE, "height"), True, 4),
    RandAugmentOp("Rotate", Geometric("rotate"), Linear(0.0, 30.0), True, 5),
    RandAugmentOp("Brightness", Lookup(_brightness), Linear(0.0, 0.9), True, 6),
    RandAugmentOp("Color", Blend(_gray), Linear(0.0, 0.9), True, 7),
    RandAugmentOp("Contrast", Lookup(_contrast, _gray_mean), Linear(0.0, 0.9), True, 8),
    RandAugmentOp("Sharpness", Blend(_smoothed), Linear(0.0, 0.9), True, 9),
    RandAugmentOp("Posterize", Lookup(_posterize), Bits(8, 4), False, 10),
    RandAugmentOp("Solarize", Lookup(_solarize), Linear(255.0, 0.0), False, 11),
    RandAugmentOp("AutoContrast", Lookup(_stretch, _bounds), None, False, 12),
    RandAugmentOp("Equalize", Lookup(_equalize, _histograms), None, False, 13),
)  # fmt: skip
RANDAUGMENT_OPS = tuple(row.name for row in RANDAUGMENT)


def op_row(name: str) -> RandAugmentOp:
    """The row of the op called ``name``; ValueError for an unknown name."""
    for row in RANDAUGMENT:
        if row.name == name:
            return row
    raise ValueError(f"unknown RandAugment op {name!r}; expected one of {RANDAUGMENT_OPS}")


@lru_cache(maxsize=4)
def rows_of(kind: type) -> tuple[tuple[int, RandAugmentOp], ...]:
    """``(index, row)`` of every op of one kind (``Geometric``, ``Lookup``, ``Blend``), in table order."""
    return tuple((k, row) for k, row in enumerate(RANDAUGMENT) if row.kind is kind)


@lru_cache(maxsize=8)
def signed_ops(device: str = "cpu") -> Tensor:
    """``(num_ops,)`` bool on ``device``, by op index: which ops' arguments take a random sign (read-only)."""
    return torch.tensor([row.signed for row in RANDAUGMENT], device=device)


@lru_cache(maxsize=8)
def affine_codes(device: str = "cpu") -> Tensor:
    """``(num_ops,)`` int64 on ``device``, by op index: the index in ``AFFINE_PARAMS`` of the parameter a
    geometric op sets, ``len(AFFINE_PARAMS)`` (the identity) for the other ops (read-only)."""
    codes = [
        AFFINE_PARAMS.index(row.op.affine) if isinstance(row.op, Geometric) else len(AFFINE_PARAMS)
        for row in RANDAUGMENT
    ]
    return torch.tensor(codes, dtype=torch.int64, device=device)


@lru_cache(maxsize=1)
def kernel_codes() -> Tensor:
    """``(num_ops,)`` int64 CPU tensor, by op index: the ops' codes in ``augment_kernels.c`` (read-only)."""
    return torch.tensor([row.kernel_code for row in RANDAUGMENT], dtype=torch.int64)
