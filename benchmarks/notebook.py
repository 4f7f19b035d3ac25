"""The notebook's per-image training transforms, in its order, as torchvision builds them: the reference arm
of the augmentation and GPU benchmarks. Every value comes from tinyswin's `seed` presets (the augmentation
preset and the `seed` training config's normalisation), the one place the recipe is written out."""

from __future__ import annotations

import torchvision.transforms as T

from tinyswin.config import load_config
from tinyswin.data.augment import augment_preset


def notebook_normalization() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the notebook, on the 0..1 scale."""
    data = load_config("seed").data
    assert data.mean is not None and data.std is not None
    return tuple(data.mean), tuple(data.std)


def notebook_transform(
    size: int | None = None, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> T.Compose:
    """PIL image -> float (3, size, size): RandomResizedCrop, flip, RandAugment, ColorJitter, ToTensor,
    Normalize, RandomErasing (torchvision v1 transforms), with the `seed` presets' values.

    Args:
        size: output side (default: the preset's 64).
        mean, std: normalisation (default: the notebook's).
    """
    aug = augment_preset("seed")
    default_mean, default_std = notebook_normalization()
    return T.Compose(
        [
            T.RandomResizedCrop(size or aug.out_size, scale=aug.crop_scale, ratio=aug.crop_ratio),
            T.RandomHorizontalFlip(aug.hflip),
            T.RandAugment(
                num_ops=aug.randaug_ops,
                magnitude=int(aug.randaug_magnitude),
                num_magnitude_bins=aug.randaug_bins,
            ),
            T.ColorJitter(aug.jitter_brightness, aug.jitter_contrast, aug.jitter_saturation, aug.jitter_hue),
            T.ToTensor(),
            T.Normalize(mean or default_mean, std or default_std),
            T.RandomErasing(
                p=aug.erase_p, scale=aug.erase_scale, ratio=aug.erase_ratio, value=aug.erase_value
            ),
        ]
    )
