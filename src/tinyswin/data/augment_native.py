"""Native CPU kernels for the per-pixel augmentation stages, with the eager PyTorch ops as the fallback.

On a CPU, the eager batched ops (``augment_ops``, ``augment_policy``) spend most of their time in PyTorch's
per-op overhead and in passes over batches that do not fit in cache: a ColorJitter hue shift alone is ~45
ops over the batch. ``augment_kernels.c`` does the same arithmetic pixel by pixel, one sample at a time, for
the three stages that dominate: the bilinear RandomResizedCrop (reading the uint8 batch directly), the
RandAugment pixel ops of one op slot, and ColorJitter followed by Normalize. Results are bit for bit those
of the eager ops (tests/test_augment_native.py).

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

__all__ = ["NativeKernels", "load"]

_SOURCE = "augment_kernels.c"
# no fused multiply-add (every float32 expression rounds as PyTorch's separate ops do), no fast-math; not
# trapping on float exceptions (which changes no result) lets selections and floor become vector code
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fPIC", "-shared"]
_P = ctypes.c_void_p
_I = ctypes.c_int64


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


class NativeKernels:
    """ctypes bindings of ``augment_kernels.c``; every method checks shapes, dtypes and contiguity.

    Args:
        path: the compiled shared library.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        lib.crop_bilinear_u8.argtypes = [_P, _I, _I, _I, _I, _I, _I, _I, _P, _P, _I, _I, _P, _P, _P, _P]
        lib.randaugment_slot.argtypes = [_P, _I, _I, _I, _P, _P, _I, _P, _P, _P, _P]
        lib.color_jitter.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P]
        for fn in (lib.crop_bilinear_u8, lib.randaugment_slot, lib.color_jitter):
            fn.restype = None
        self._lib = lib

    def __repr__(self) -> str:
        return f"NativeKernels({self.path})"

    @staticmethod
    def _check_batch(x: Tensor) -> tuple[int, int, int]:
        if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or x.shape[1] != 3:
            got = f"{x.dtype} {tuple(x.shape)} on {x.device}"
            raise ValueError(f"native kernels need a contiguous float32 CPU (N, 3, H, W) batch, got {got}")
        return int(x.shape[0]), int(x.shape[2]), int(x.shape[3])

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
        n, c, h, w = images.shape
        if images.dtype != torch.uint8 or images.device.type != "cpu" or c != 3:
            raise ValueError(f"crop_bilinear needs a uint8 CPU (N, 3, H, W) batch, got {images.dtype}")
        ys = ys.to(torch.float64).contiguous()
        xs = xs.to(torch.float64).contiguous()
        if ys.shape[0] != n or xs.shape[0] != n:
            raise ValueError(f"crop_bilinear: {n} images but coordinates for {ys.shape[0]}, {xs.shape[0]}")
        oh, ow = int(ys.shape[1]), int(xs.shape[1])
        out = torch.empty(n, 3, oh, ow, dtype=torch.float32)
        work_row = torch.empty(3 * w, dtype=torch.float32)
        work_idx = torch.empty(2 * ow, dtype=torch.int32)
        work_wt = torch.empty(2 * ow, dtype=torch.float32)
        sn, sc, sh, sw = images.stride()
        self._lib.crop_bilinear_u8(
            images.data_ptr(), n, h, w, sn, sc, sh, sw, ys.data_ptr(), xs.data_ptr(), oh, ow,
            out.data_ptr(), work_row.data_ptr(), work_idx.data_ptr(), work_wt.data_ptr(),
        )  # fmt: skip
        return out

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
            ops: ``(N,)`` int64 indices into ``RANDAUGMENT_OPS``.
            values: ``(N,)`` float64 signed op arguments.
            warps: ``(matrices, xs, ys)`` to run the geometric ops too (nearest neighbour): float32
                ``(N, 3, 2)`` rescaled inverse matrices (zeros where unused) and torchvision's grid bases
                ``(W,)``, ``(H,)``; None when the caller has applied them.

        Returns:
            ``x``.
        """
        n, h, w = self._check_batch(x)
        ops = ops.to(torch.int64).contiguous()
        values = values.to(torch.float64).contiguous()
        if ops.shape != (n,) or values.shape != (n,):
            raise ValueError(f"randaugment_slot_: need ({n},) ops and values")
        matrices = xs = ys = None
        if warps is not None:
            matrices, xs, ys = (t.to(torch.float32).contiguous() for t in warps)
            if matrices.shape != (n, 3, 2) or xs.shape != (w,) or ys.shape != (h,):
                raise ValueError("randaugment_slot_: warps must be (N, 3, 2) matrices, (W,) and (H,) bases")
        work = torch.empty(3 * h * w, dtype=torch.float32)
        self._lib.randaugment_slot(
            x.data_ptr(), n, h, w, ops.data_ptr(), values.data_ptr(), int(warps is not None),
            *(None if t is None else t.data_ptr() for t in (matrices, xs, ys)), work.data_ptr(),
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
        n, h, w = self._check_batch(x)
        order = order.to(torch.int64).contiguous()
        factors = factors.to(torch.float64).contiguous()
        if order.shape != (n, 4) or factors.shape != (n, 4):
            raise ValueError(f"color_jitter_: need ({n}, 4) order and factors")
        flags = torch.tensor(enabled, dtype=torch.uint8)
        scale = shift = None
        if normalize is not None:
            scale, shift = (t.to(torch.float32).contiguous() for t in normalize)
        work = torch.empty(h * w, dtype=torch.float32)
        self._lib.color_jitter(
            x.data_ptr(), n, h * w, order.data_ptr(), factors.data_ptr(), flags.data_ptr(),
            None if scale is None else scale.data_ptr(), None if shift is None else shift.data_ptr(),
            work.data_ptr(),
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
    from tinyswin.config import cache_root

    return _load_cached(str(cache_root() / "kernels"))
