"""Per-sample random augmentation of whole uint8 batches, on whatever device the batch is on.

``build_augment(preset_or_config, mean, std, num_classes)`` returns an ``Augment``; calling it on a uint8
batch ``(B, H, W, 3)`` (or ``(B, 3, H, W)``), its int64 labels and a CPU ``torch.Generator`` returns the
normalized float batch ``(B, 3, H', W')`` and the targets. Every sample gets its own random parameters.
All of them are drawn on the CPU with the given generator (``Augment.sample``) and only then applied
(``Augment.apply``), so a CPU batch and a CUDA batch with the same seed get the same draws.

The pipeline, in the notebook's order:

1. crop: ``RandomResizedCrop`` (``crop='rrc'``), ``RandomCrop`` with zero padding (``crop='pad'``) or none
   (``crop='none'``, a plain resize when ``out_size`` differs from the stored size); horizontal flip.
2. ``RandAugment`` (torchvision's 14 ops and magnitude bins, one row each in ``augment_table``; per-sample
   ops and signs, optional magnitude std).
3. ``ColorJitter`` (brightness, contrast, saturation, hue; per-sample order of the four).
4. to float in [0, 1] and ``Normalize(mean, std)``.
5. ``RandomErasing`` (per-pixel normal noise or a constant).
6. Mixup / CutMix with soft targets (per batch, as the notebook, or per sample).

Steps 1-3 keep the batch as float32 whole numbers in [0, 255] and reproduce torchvision's uint8 tensor
ops (``torchvision.transforms.functional``, the v1 API): same float32 arithmetic, same rounding and
truncation back to uint8, same parameter distributions. With the parameters pinned, every colour and
pixel op, every nearest-neighbour RandAugment warp (torchvision's default) and every bilinear crop that
does not shrink (the 64px recipes) gives torchvision's result bit for bit; shrinking (antialiased) or
bicubic crops and bilinear RandAugment warps can differ by one level where a value sits on a .5 rounding
tie. The crop and RandAugment warps are separate resamplings, as in torchvision (composing them into one
warp would change the fill and skip the intermediate rounding). Differences from the notebook, which ran
the same transforms on PIL images: PIL's filters round differently from torchvision's tensor ops (a level
on some pixels), and the random streams differ.

Mixing follows the notebook's per-batch rule by default: Mixup with probability ``mixup_p``, otherwise
CutMix with probability ``cutmix_p`` (``mix_select='sequential'``; 'exclusive' makes the two
probabilities absolute). Lambda ~ Beta(alpha, alpha), clipped to ``mix_lambda_clip``; the CutMix box is
clipped to the image and lambda recomputed from its area; soft targets are ``lam * y + (1 - lam) *
y[partner]`` (with ``mix_label_smoothing`` folded into both one-hot vectors).

Backends (``augment_backend``): ``Augment.apply`` runs the steps above, in that order, on one backend
chosen per device type by ``Augment.backend``. ``EagerBackend`` (GPU batches, and CPU batches with
``native=False`` or without a C compiler) runs batched PyTorch ops: nothing loops over samples in Python,
every op runs on all the samples that drew it (gathered with ``index_select``, written back with
``index_copy_``). On a CPU that costs one PyTorch op per arithmetic step over batches larger than the
cache, so ``NativeBackend`` runs the compiled kernels of ``augment_native`` instead (the same results bit
for bit): steps 1-4 in one call, one sample at a time while it is in cache, and per-batch Mixup/CutMix in
place; a step its kernels cannot do exactly (a shrinking or bicubic crop, a padded crop, bilinear
RandAugment warps, per-sample mixing) runs the eager op. Erasing is the same on both.

For GPU runs, ``AugmentConfig.device_params`` switches to a third path (``augment_device``, through
``Augment.call_device``): the parameters are drawn on the batch's device (seeded from one draw of the CPU
generator) and every step runs on all samples with shapes fixed by the config, so that no batch waits for the
device (no ``.item()``, ``.nonzero()``, boolean masks or copies from the host). For the same parameters it
gives the eager path's crops, RandAugment and ColorJitter bit for bit; its random streams differ.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tinyswin.data.augment_backend import (
    EagerBackend,
    channels_first,
    choose_backend,
    normalization_constants,
    normalize_,
    to_float_nchw,
)
from tinyswin.data.augment_config import AugmentConfig, augment_preset, augment_preset_names
from tinyswin.data.augment_device import apply_device, sample_device
from tinyswin.data.augment_geometry import resize
from tinyswin.data.augment_native import NativeKernels
from tinyswin.data.augment_sample import AugmentParams, sample_params

__all__ = [
    "Augment",
    "AugmentConfig",
    "AugmentParams",
    "augment_preset",
    "augment_preset_names",
    "build_augment",
]


def _image_hw(images: Tensor) -> tuple[int, int]:
    """(H, W) of a uint8 batch in either layout."""
    if images.ndim == 4 and images.shape[-1] == 3:
        return int(images.shape[1]), int(images.shape[2])
    return int(images.shape[-2]), int(images.shape[-1])


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` of an eval size: a side (square) or a height and width."""
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"augment: size must be an int or a (height, width) pair, got {size!r}")
    return int(size[0]), int(size[1])


class Augment:
    """Callable training augmentation and eval normalization for one dataset.

    Args:
        config: the pipeline.
        mean, std: per-channel normalization (3 floats each, 0..1 scale).
        num_classes: number of classes (width of soft targets).
        native: on CPU batches, run the pipeline on ``NativeBackend`` (the compiled kernels of
            ``augment_native`` where they are available: the same results, several times faster); False
            always runs ``EagerBackend``.
    """

    def __init__(
        self,
        config: AugmentConfig,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int,
        native: bool = True,
    ) -> None:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"augment: mean and std need 3 values each, std > 0; got mean={mean}, std={std}")
        if num_classes < 1:
            raise ValueError(f"augment: num_classes must be >= 1, got {num_classes}")
        self.config = config
        self.mean = mean
        self.std = std
        self.num_classes = int(num_classes)
        self.native = bool(native)
        self._backends: dict[str, EagerBackend] = {}  # by device type
        self._generators: dict[str, torch.Generator] = {}  # by device, for ``device_params``
        self._normalizations: dict[str, tuple[Tensor, Tensor]] = {}  # by device

    def __repr__(self) -> str:
        return (
            f"Augment({self.config}, mean={self.mean}, std={self.std}, num_classes={self.num_classes}, "
            f"native={self.native})"
        )

    def __getstate__(self) -> dict[str, Any]:
        """Picklable state: the backends (which hold a loaded library), generators and device tensors are made
        again after unpickling."""
        return {**self.__dict__, "_backends": {}, "_generators": {}, "_normalizations": {}}

    def backend(self, device: torch.device) -> EagerBackend:
        """The backend for batches on ``device``, chosen on first use per device type.

        ``NativeBackend`` for CPU batches with ``native`` when the kernels load (``augment_native.load``),
        else ``EagerBackend``.
        """
        if device.type not in self._backends:
            self._backends[device.type] = choose_backend(self.config, device.type, self.native)
        return self._backends[device.type]

    def kernels(self, device: torch.device) -> NativeKernels | None:
        """The native kernels used for a batch on ``device`` (None where the backend is eager)."""
        return self.backend(device).kernels

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') of the training batches for stored images of size (height, width)."""
        size = self.config.out_size
        return (height, width) if size is None else (size, size)

    def sample(
        self, batch_size: int, height: int, width: int, generator: torch.Generator, mix: bool = True
    ) -> AugmentParams:
        """Draw every random parameter of one batch on the CPU.

        Args:
            batch_size: B.
            height, width: stored image size.
            generator: CPU generator (its state advances).
            mix: draw Mixup / CutMix (False: no mixing).

        Returns:
            AugmentParams.
        """
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(f"augment: generator must be a CPU torch.Generator, got {generator!r}")
        out_hw = self.output_size(height, width)
        return sample_params(self.config, batch_size, height, width, out_hw, generator, mix=mix)

    def augment_uint8(self, images: Tensor, params: AugmentParams, normalize: bool = False) -> Tensor:
        """Crop, flip, RandAugment and ColorJitter (steps 1-3): the uint8-valued part of the pipeline.

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)``.
            params: draws from ``sample`` for this batch.
            normalize: also apply ``Normalize(mean, std)`` (step 4).

        Returns:
            ``(B, 3, H', W')`` float32 whole numbers in [0, 255], or normalized with ``normalize``.
        """
        normalization = self._normalization(images.device) if normalize else None
        out_hw = self.output_size(*_image_hw(images))
        return self.backend(images.device).augment_uint8(images, params, out_hw, normalization)

    def _normalization(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """`augment_backend.normalization_constants` on ``device``, made once per device (a copy to a GPU
        waits for it)."""
        key = str(device)
        if key not in self._normalizations:
            self._normalizations[key] = normalization_constants(self.mean, self.std, device)
        return self._normalizations[key]

    def apply(self, images: Tensor, labels: Tensor, params: AugmentParams) -> tuple[Tensor, Tensor]:
        """Run the pipeline with given draws.

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` on any device.
            labels: ``(B,)`` int64.
            params: draws from ``sample`` for this batch.

        Returns:
            ``(x, targets)``: float32 ``(B, 3, H', W')`` on the images' device; int64 ``(B,)`` labels, or
            float32 ``(B, num_classes)`` soft targets when a mix was applied.
        """
        backend = self.backend(images.device)
        x = self.augment_uint8(images, params, normalize=True)
        if params.erase is not None:
            x = backend.erase(x, params.erase)
        labels = labels.to(device=x.device, dtype=torch.int64)
        if params.mix is not None and params.mix.any:
            return backend.mix(x, labels, params.mix, self.num_classes, self.config.mix_label_smoothing)
        return x, labels

    def __call__(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, mix: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Augment one training batch with fresh per-sample draws from ``generator``.

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` on any device.
            labels: ``(B,)`` int64.
            generator: CPU ``torch.Generator``.
            mix: False turns Mixup / CutMix off.

        Returns:
            ``(x, targets)`` as ``apply``.
        """
        if self.config.device_params:  # one 63-bit seed from the CPU stream seeds the batch's device draws
            seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
            return self.call_device(images, labels, seed, mix=mix)
        height, width = _image_hw(images)
        params = self.sample(images.shape[0], height, width, generator, mix=mix)
        return self.apply(images, labels, params)

    def call_device(
        self, images: Tensor, labels: Tensor, seed: int, mix: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Augment one training batch with its parameters drawn on its own device, without a host sync
        (``augment_device``; what ``__call__`` runs with ``device_params``).

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` on any device.
            labels: ``(B,)`` int64.
            seed: seeds the device generator (per-sample draws) and the host stream (per-batch mixing).
            mix: False turns Mixup / CutMix off.

        Returns:
            ``(x, targets)`` as ``apply``.
        """
        channels_first(images)  # checks the batch
        device = images.device
        if str(device) not in self._generators:
            self._generators[str(device)] = torch.Generator(device=device)
        generator = self._generators[str(device)].manual_seed(seed)
        height, width = _image_hw(images)
        out_hw = self.output_size(height, width)
        params = sample_device(
            self.config, images.shape[0], height, width, out_hw, generator, random.Random(seed), mix=mix
        )
        normalization = self._normalization(device)
        return apply_device(self.config, images, labels, params, normalization, self.num_classes, out_hw)

    def normalize(self, images: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
        """Eval path: optional resize (antialiased, rounded, with the config's interpolation), then normalize.

        Args:
            images: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` on any device.
            size: test resolution: a side (square), a ``(height, width)`` pair, or None to keep the stored
                size.

        Returns:
            ``(B, 3, H', W')`` float32.
        """
        x = to_float_nchw(images)
        if size is not None:
            x = resize(x, _size_hw(size), self.config.interpolation)
        return normalize_(x, self._normalization(x.device))


def build_augment(
    preset_or_config: str | AugmentConfig | Mapping[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
    native: bool = True,
) -> Augment:
    """Build the augmentation for a dataset.

    Args:
        preset_or_config: preset name, AugmentConfig, or a mapping of AugmentConfig fields (an optional
            'preset' entry names the base preset, default 'none').
        mean, std: per-channel normalization (3 floats each, 0..1 scale).
        num_classes: number of classes.
        native: use the compiled CPU kernels where they apply (see ``Augment``).

    Returns:
        Augment.
    """
    if isinstance(preset_or_config, str):
        config = augment_preset(preset_or_config)
    elif isinstance(preset_or_config, AugmentConfig):
        config = preset_or_config
    elif isinstance(preset_or_config, Mapping):
        fields = dict(preset_or_config)
        config = augment_preset(fields.pop("preset", "none"), **fields)
    else:
        raise ValueError(
            f"augment: expected a preset name, AugmentConfig or mapping, got {preset_or_config!r}"
        )
    return Augment(config, mean, std, num_classes, native=native)
