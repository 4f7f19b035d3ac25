"""Native CPU kernels for the per-pixel augmentation stages, with the eager PyTorch ops as the fallback.

On a CPU, the eager batched ops (``augment_ops``, ``augment_policy``) spend most of their time in PyTorch's
per-op overhead and in passes over batches that do not fit in cache: a ColorJitter hue shift alone is ~45
ops over the batch. ``augment_kernels.c`` does the same arithmetic pixel by pixel, one sample at a time while
it is in cache: the bilinear RandomResizedCrop (reading the uint8 batch directly), the RandAugment ops (warps
included), ColorJitter and Normalize, all in one call (``augment``) or stage by stage; and per-batch
Mixup/CutMix in place (``mix_batch_``). Results are bit for bit those of the eager ops
(tests/test_augment_native.py). ``augment_backend.NativeBackend`` decides which steps run here.

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
``<cache_root>/kernels/`` under a name derived from the source and flags, written atomically, and loaded
with ctypes; later processes reuse it. Where no compiler works, or with ``TINYSWIN_NATIVE=0``, ``load()``
returns None and the augmentation runs the eager ops (one warning says why). CUDA batches always run the
eager ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from tinyswin.data.augment_table import kernel_codes
from tinyswin.paths import cache_root

__all__ = ["NativeKernels", "load"]

_SOURCE = "augment_kernels.c"
# no fused multiply-add (every float32 expression rounds as PyTorch's separate ops do), no fast-math; not
# trapping on float exceptions (which changes no result) lets selections and floor become vector code
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fPIC", "-shared"]
_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float


def _compiler_flags() -> list[str]:
    """Base flags, plus AVX2 where PyTorch itself runs AVX2 code on this CPU (wider vector loops)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return _FLAGS + (["-mavx2"] if capability in ("AVX2", "AVX512") else [])


def _build(source: Path, flags: list[str], out_dir: Path) -> Path:
    """Compile ``source`` into ``out_dir`` (once per source and flags) and return the library's path."""
    compiler = os.environ.get("CC") or "cc"
    digest = hashlib.sha256(source.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = out_dir / f"augment_kernels-{digest}.so"
    if target.is_file():
        return target
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} is not on PATH (set CC to use another)")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", tmp, str(source)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source}: {result.stderr.strip()[:400]}")
        os.replace(tmp, target)  # atomic: a concurrent build or reader never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    """The argument types of the library's functions (``augment_kernels.c``)."""
    lib.work_floats.argtypes = [_I, _I, _I]
    lib.work_floats.restype = _I
    lib.randaugment_slot.argtypes = [_P, _I, _I, _I, _P, _P, _I, _P, _P, _P, _P]
    lib.color_jitter.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P]
    lib.augment_fused.argtypes = [_P, *[_I] * 7, _P, _P, _I, _I, _I, *[_P] * 12]
    lib.mix_batch.argtypes = [_P, _I, _I, _I, _I, _P, _I, _F, _F, _I, _I, _I, _I, _P, _P]
    for fn in (lib.randaugment_slot, lib.color_jitter, lib.augment_fused, lib.mix_batch):
        fn.restype = None


def _check_batch(x: Tensor) -> tuple[int, int, int]:
    """``(N, H, W)`` of a contiguous float32 CPU ``(N, 3, H, W)`` batch; ValueError for anything else."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or x.shape[1] != 3:
        got = f"{x.dtype} {tuple(x.shape)} on {x.device}"
        raise ValueError(f"native kernels need a contiguous float32 CPU (N, 3, H, W) batch, got {got}")
    return int(x.shape[0]), int(x.shape[2]), int(x.shape[3])


class _Arguments:
    """Contiguous copies of a call's tensor arguments, kept alive until the call returns."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.kept: list[Tensor] = []

    def __call__(self, t: Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> int | None:
        """The address of ``t`` as a contiguous ``dtype`` tensor of ``shape`` (None for None)."""
        if t is None:
            return None
        t = t.to(dtype).contiguous()
        if tuple(t.shape) != shape:
            raise ValueError(f"{self.what}: expected an argument of shape {shape}, got {tuple(t.shape)}")
        self.kept.append(t)
        return t.data_ptr()


class NativeKernels:
    """ctypes bindings of ``augment_kernels.c``; every method checks shapes, dtypes and contiguity.

    Args:
        path: the compiled shared library.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        _declare(self._lib)

    def _work(self, h: int, w: int, w_in: int = 0) -> Tensor:
        """Scratch memory for one sample of size (h, w) (source width ``w_in`` for the crop)."""
        return torch.empty(int(self._lib.work_floats(h, w, w_in)), dtype=torch.float32)

    def __repr__(self) -> str:
        return f"NativeKernels({self.path})"

    def crop_bilinear(self, images: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
        """Bilinear resized crop of a uint8 batch at given source coordinates, rounded to whole numbers.

        Args:
            images: uint8 ``(N, 3, H, W)`` CPU tensor, any strides (a permuted ``(N, H, W, 3)`` batch too).
            ys: ``(N, oh)`` float64 source row of each output row (clamped to the crop, absolute).
            xs: ``(N, ow)`` float64 source column of each output column (clamped, absolute, mirrored
                where flipped).

        Returns:
            ``(N, 3, oh, ow)`` float32 whole numbers.
        """
        return self.augment(images, ys, xs, None, None, None)

    def randaugment_slot_(
        self,
        x: Tensor,
        ops: Tensor,
        values: Tensor,
        warps: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """In place: one RandAugment op slot on each sample.

        Args:
            x: ``(N, 3, H, W)`` contiguous float32 CPU batch of whole numbers; overwritten.
            ops: ``(N,)`` int64 indices into ``RANDAUGMENT_OPS`` (the kernels get the ops' codes,
                ``augment_table.kernel_codes``).
            values: ``(N,)`` float64 signed op arguments.
            warps: ``(matrices, xs, ys)`` to run the geometric ops too (nearest neighbour): float32
                ``(N, 3, 2)`` rescaled inverse matrices (zeros where unused) and torchvision's grid bases
                ``(W,)``, ``(H,)``; None when the caller has applied them.

        Returns:
            ``x``.
        """
        n, h, w = _check_batch(x)
        if ops.shape != (n,) or values.shape != (n,):
            raise ValueError(f"randaugment_slot_: need ({n},) ops and values")
        matrices = xs = ys = None
        if warps is not None:
            matrices, xs, ys = warps
            if matrices.shape != (n, 3, 2) or xs.shape != (w,) or ys.shape != (h,):
                raise ValueError("randaugment_slot_: warps must be (N, 3, 2) matrices, (W,) and (H,) bases")
        arg = _Arguments("randaugment_slot_")
        work = self._work(h, w)
        self._lib.randaugment_slot(
            x.data_ptr(), n, h, w, arg(kernel_codes()[ops], torch.int64, (n,)),
            arg(values, torch.float64, (n,)), int(warps is not None), arg(matrices, torch.float32, (n, 3, 2)),
            arg(xs, torch.float32, (w,)), arg(ys, torch.float32, (h,)), work.data_ptr(),
        )  # fmt: skip
        return x

    def color_jitter_(
        self,
        x: Tensor,
        order: Tensor,
        factors: Tensor,
        enabled: tuple[bool, bool, bool, bool],
        normalize: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """In place: ColorJitter in each sample's order, then optionally ``x * scale - shift`` per channel.

        Args:
            x: ``(N, 3, H, W)`` contiguous float32 CPU batch of whole numbers; overwritten.
            order: ``(N, 4)`` int64 op order (brightness, contrast, saturation, hue indices).
            factors: ``(N, 4)`` float64 factors, hue shift last.
            enabled: which of the four ops are on.
            normalize: ``(scale, shift)`` float32 ``(3,)`` tensors, or None.

        Returns:
            ``x``.
        """
        n, h, w = _check_batch(x)
        order = order.to(torch.int64).contiguous()
        factors = factors.to(torch.float64).contiguous()
        if order.shape != (n, 4) or factors.shape != (n, 4):
            raise ValueError(f"color_jitter_: need ({n}, 4) order and factors")
        flags = torch.tensor(enabled, dtype=torch.uint8)
        scale = shift = None
        if normalize is not None:
            scale, shift = (t.to(torch.float32).contiguous() for t in normalize)
        work = self._work(h, w)
        self._lib.color_jitter(
            x.data_ptr(), n, h * w, order.data_ptr(), factors.data_ptr(), flags.data_ptr(),
            None if scale is None else scale.data_ptr(), None if shift is None else shift.data_ptr(),
            work.data_ptr(),
        )  # fmt: skip
        return x

    def augment(
        self,
        images: Tensor,
        ys: Tensor,
        xs: Tensor,
        randaug: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None,
        jitter: tuple[Tensor, Tensor, tuple[bool, bool, bool, bool]] | None,
        normalize: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """Crop, RandAugment, ColorJitter and Normalize, one sample at a time while it is in cache.

        Args:
            images: uint8 ``(N, 3, H, W)`` CPU tensor, any strides.
            ys, xs: crop source coordinates, as ``crop_bilinear``.
            randaug: ``(ops, values, matrices, grid_xs, grid_ys)``: ``(N, S)`` int64 ops, ``(N, S)``
                float64 values, ``(N, S, 3, 2)`` float32 warp matrices, ``(ow,)`` and ``(oh,)`` grid bases
                (see ``randaugment_slot_``); None for no RandAugment.
            jitter: ``(order, factors, enabled)`` as ``color_jitter_``; None for no ColorJitter.
            normalize: ``(scale, shift)`` float32 ``(3,)``, or None.

        Returns:
            ``(N, 3, oh, ow)`` float32.
        """
        n, c, h, w = images.shape
        if images.dtype != torch.uint8 or images.device.type != "cpu" or c != 3:
            raise ValueError(
                f"augment needs a uint8 CPU (N, 3, H, W) batch, got {images.dtype} {images.shape}"
            )
        ys, xs = ys.to(torch.float64).contiguous(), xs.to(torch.float64).contiguous()
        oh, ow = int(ys.shape[1]), int(xs.shape[1])
        if ys.shape[0] != n or xs.shape[0] != n:
            raise ValueError(f"augment: {n} images but crop coordinates for {ys.shape[0]}, {xs.shape[0]}")
        ptr = _Arguments("augment")
        slots = 0 if randaug is None else int(randaug[0].shape[1])
        ops, values, matrices, gxs, gys = randaug if randaug is not None else (None,) * 5
        codes = None if ops is None else kernel_codes()[ops]  # (N, S): the ops' codes in the kernels
        order, factors, enabled = jitter if jitter is not None else (None, None, (False,) * 4)
        scale, shift = normalize if normalize is not None else (None, None)
        out = torch.empty(n, 3, oh, ow, dtype=torch.float32)
        work = self._work(oh, ow, w)
        sn, sc, sh, sw = images.stride()
        self._lib.augment_fused(
            images.data_ptr(), n, h, w, sn, sc, sh, sw, ys.data_ptr(), xs.data_ptr(), oh, ow, slots,
            ptr(codes, torch.int64, (n, slots)), ptr(values, torch.float64, (n, slots)),
            ptr(matrices, torch.float32, (n, slots, 3, 2)), ptr(gxs, torch.float32, (ow,)),
            ptr(gys, torch.float32, (oh,)), ptr(order, torch.int64, (n, 4)),
            ptr(factors, torch.float64, (n, 4)), ptr(torch.tensor(enabled), torch.uint8, (4,)),
            ptr(scale, torch.float32, (3,)), ptr(shift, torch.float32, (3,)), out.data_ptr(), work.data_ptr(),
        )  # fmt: skip
        return out

    def mix_batch_(self, x: Tensor, partner: Tensor, mode: int, lam: float, box: tuple[int, ...]) -> Tensor:
        """In place: per-batch Mixup (``mode`` 1) or CutMix (``mode`` 2) with a partner permutation.

        Mixup: ``x[i] = float32(lam) * x[i] + float32(1 - lam) * x[partner[i]]``; CutMix: the box
        ``(y1, y2, x1, x2)`` of ``x[partner[i]]`` pasted into ``x[i]``. Same results as ``augment_mix.mix_``.

        Args:
            x: ``(N, C, H, W)`` contiguous float32 CPU batch; overwritten.
            partner: ``(N,)`` int64 permutation.
            mode: 1 (Mixup) or 2 (CutMix).
            lam: Mixup weight of the sample's own image.
            box: CutMix ``(y1, y2, x1, x2)``.

        Returns:
            ``x``.
        """
        if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or x.ndim != 4:
            raise ValueError(f"mix_batch_ needs a contiguous float32 CPU (N, C, H, W) batch, got {x.shape}")
        n, c, h, w = x.shape
        partner = partner.to(torch.int64).contiguous()
        if partner.shape != (n,) or not torch.equal(partner.sort().values, torch.arange(n)):
            raise ValueError(f"mix_batch_: partner must be a permutation of {n} samples")
        work = torch.empty(c * h * w, dtype=torch.float32)
        done = torch.empty(n, dtype=torch.uint8)
        y1, y2, x1, x2 = (int(v) for v in box)
        self._lib.mix_batch(
            x.data_ptr(), n, c, h, w, partner.data_ptr(), int(mode), float(lam), float(1.0 - lam),
            y1, y2, x1, x2, work.data_ptr(), done.data_ptr(),
        )  # fmt: skip
        return x


@cache
def _load_cached(cache_dir: str) -> NativeKernels | None:
    source = resources.files("tinyswin.data").joinpath(_SOURCE)
    try:
        with resources.as_file(source) as path:
            library = _build(Path(path), _compiler_flags(), Path(cache_dir))
        return NativeKernels(library)
    except (OSError, RuntimeError) as err:
        warnings.warn(
            f"tinyswin: native augmentation kernels unavailable ({err}); using the slower eager ops",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def load() -> NativeKernels | None:
    """The compiled kernels (built on first use), or None with ``TINYSWIN_NATIVE=0`` or without a compiler."""
    if os.environ.get("TINYSWIN_NATIVE", "1") == "0":
        return None
    return _load_cached(str(cache_root() / "kernels"))
